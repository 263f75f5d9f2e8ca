// CUDA-IPC intra-node all-to-all. Each rank owns one buffer, mapped by every peer of the node:
//   [ready[R] u64 | consumed u64 | sent_blocks[R] u64 | pad to 256 B][data: receive space]
// A sender waits until the receiver has consumed the previous epoch (so its receive space is
// free), writes its rows straight into the receiver's data at the offset the host computed from
// the split matrix; every block fences its writes system-wide and counts itself in the sender's
// own sent_blocks[dst], and the last block publishes ready[sender] = epoch in the receiver with a
// system-scope release. The receiver's stream waits (acquire) for every ready flag, copies the
// data out and publishes consumed = epoch. Everything is stream-ordered: no host synchronisation.
#include "common.cuh"

#include <cstring>

namespace ep {
namespace {

constexpr int kCopyThreads = 512;
constexpr int64_t kCopyBlocks = 64;

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

uint64_t to_ns(int64_t timeout_ms) {
  return timeout_ms > 0 ? uint64_t(timeout_ms) * 1000000ull : 0;  // 0: wait forever
}

// Word offsets in the header.
__host__ __device__ constexpr int64_t consumed_word(int64_t R) { return R; }
__host__ __device__ constexpr int64_t sent_blocks_word(int64_t R) { return R + 1; }
__host__ __device__ constexpr int64_t header_bytes(int64_t R) {
  return ((2 * R + 1) * int64_t(sizeof(uint64_t)) + 255) / 256 * 256;
}

// Spins until *flag >= want; traps (a sticky launch error on the stream) after timeout_ns.
__device__ void wait_flag(const uint64_t* flag, uint64_t want, uint64_t timeout_ns, int64_t who) {
  const uint64_t start = globaltimer_ns();
  while (load_acquire_sys(flag) < want) {
    if (timeout_ns > 0 && globaltimer_ns() - start > timeout_ns) {
      printf("epruntime cuda_ipc: timed out waiting for rank %lld at epoch %llu\n", (long long)who,
             (unsigned long long)want);
      __trap();
    }
    __nanosleep(256);
  }
}

// Waits for the receiver to free its space, copies nbytes (grid-stride over all blocks), and
// has the last block to finish publish the ready flag.
__global__ void send_kernel(const char* __restrict__ src, int64_t nbytes, char* __restrict__ dst,
                            const uint64_t* peer_consumed, uint64_t* peer_ready,
                            unsigned long long* sent_blocks, uint64_t epoch, int64_t peer,
                            uint64_t timeout_ns) {
  if (threadIdx.x == 0) wait_flag(peer_consumed, epoch - 1, timeout_ns, peer);
  __syncthreads();
  const auto a = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                 static_cast<uintptr_t>(nbytes);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if ((a & 15) == 0) {
    auto* d = reinterpret_cast<uint4*>(dst);
    const auto* s = reinterpret_cast<const uint4*>(src);
    for (int64_t i = first; i < nbytes / 16; i += stride) d[i] = s[i];
  } else {
    for (int64_t i = first; i < nbytes; i += stride) dst[i] = src[i];
  }
  __threadfence_system();  // this thread's writes reach the peer before the block counts itself
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(sent_blocks, 1ull) == gridDim.x - 1) {
    *sent_blocks = 0;  // every block has counted: reset for the next call
    __threadfence_system();
    store_release_sys(peer_ready, epoch);
  }
}

// Runs after the copy-out on the same stream: the received data has been read.
__global__ void consumed_kernel(uint64_t* flag, uint64_t epoch) {
  __threadfence_system();
  store_release_sys(flag, epoch);
}

__global__ void wait_kernel(const uint64_t* ready_R, int64_t R, uint64_t epoch,
                            uint64_t timeout_ns) {
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x)
    wait_flag(ready_R + r, epoch, timeout_ns, r);
  __syncthreads();
  __threadfence_system();
}

}  // namespace
}  // namespace ep

extern "C" int ep_ipc_handle_bytes(void) { return static_cast<int>(sizeof(cudaIpcMemHandle_t)); }

extern "C" int64_t ep_ipc_header_bytes(int64_t R) { return ep::header_bytes(R); }

extern "C" int ep_ipc_alloc(int64_t R, int64_t data_bytes, void** base_host, void* handle_host) {
  using namespace ep;
  if (R <= 0 || data_bytes < 0)
    return set_error(cudaErrorInvalidValue, "ep_ipc_alloc: need R > 0 and data_bytes >= 0");
  void* base = nullptr;
  const int64_t head = header_bytes(R);
  if (int err = check(cudaMalloc(&base, size_t(head + data_bytes)), "ep_ipc_alloc cudaMalloc"))
    return err;
  // Flags start at epoch 0; synchronise so no peer can see them before they are zero.
  int err = check(cudaMemset(base, 0, size_t(head)), "ep_ipc_alloc cudaMemset");
  if (!err) err = check(cudaDeviceSynchronize(), "ep_ipc_alloc cudaDeviceSynchronize");
  cudaIpcMemHandle_t handle;
  if (!err) err = check(cudaIpcGetMemHandle(&handle, base), "ep_ipc_alloc cudaIpcGetMemHandle");
  if (err) {
    cudaFree(base);
    return err;
  }
  std::memcpy(handle_host, &handle, sizeof(handle));
  *base_host = base;
  return ok();
}

extern "C" int ep_ipc_free(void* base) { return ep::check(cudaFree(base), "ep_ipc_free cudaFree"); }

extern "C" int ep_ipc_open(const void* handle_host, void** base_host) {
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, handle_host, sizeof(handle));
  return ep::check(cudaIpcOpenMemHandle(base_host, handle, cudaIpcMemLazyEnablePeerAccess),
                   "ep_ipc_open cudaIpcOpenMemHandle");
}

extern "C" int ep_ipc_close(void* base) {
  return ep::check(cudaIpcCloseMemHandle(base), "ep_ipc_close cudaIpcCloseMemHandle");
}

extern "C" int ep_ipc_send(const void* src, int64_t nbytes, void* own_base, void* peer_base,
                           int64_t R, int64_t dst_offset, int64_t src_rank, int64_t dst_rank,
                           uint64_t epoch, int64_t timeout_ms, void* stream) {
  using namespace ep;
  if (R <= 0 || src_rank < 0 || src_rank >= R || dst_rank < 0 || dst_rank >= R || nbytes < 0 ||
      dst_offset < 0 || epoch == 0)
    return set_error(cudaErrorInvalidValue,
                     "ep_ipc_send: bad arguments (R=%lld src_rank=%lld dst_rank=%lld nbytes=%lld "
                     "dst_offset=%lld epoch=%llu)",
                     (long long)R, (long long)src_rank, (long long)dst_rank, (long long)nbytes,
                     (long long)dst_offset, (unsigned long long)epoch);
  auto* peer = static_cast<uint64_t*>(peer_base);
  auto* own = static_cast<unsigned long long*>(own_base);
  char* data = static_cast<char*>(peer_base) + header_bytes(R);
  // Launched even for 0 bytes: the receiver waits for every sender's flag.
  const int64_t units = (nbytes + 15) / 16;
  const int64_t wanted = (units + kCopyThreads - 1) / kCopyThreads;
  const int blocks =
      static_cast<int>(wanted < 1 ? 1 : (wanted > kCopyBlocks ? kCopyBlocks : wanted));
  send_kernel<<<blocks, kCopyThreads, 0, as_stream(stream)>>>(
      static_cast<const char*>(src), nbytes, data + dst_offset, peer + consumed_word(R),
      peer + src_rank, own + sent_blocks_word(R) + dst_rank, epoch, dst_rank, to_ns(timeout_ms));
  return check(cudaGetLastError(), "ep_ipc_send launch");
}

extern "C" int ep_ipc_wait(void* base, int64_t R, uint64_t epoch, int64_t timeout_ms,
                           void* stream) {
  using namespace ep;
  if (R <= 0 || epoch == 0)
    return set_error(cudaErrorInvalidValue, "ep_ipc_wait: need R > 0 and epoch > 0");
  wait_kernel<<<1, R < 1024 ? int(R) : 1024, 0, as_stream(stream)>>>(
      static_cast<const uint64_t*>(base), R, epoch, to_ns(timeout_ms));
  return check(cudaGetLastError(), "ep_ipc_wait launch");
}

extern "C" int ep_ipc_finish(void* base, int64_t R, void* out, int64_t nbytes, uint64_t epoch,
                             void* stream) {
  using namespace ep;
  if (R <= 0 || nbytes < 0 || epoch == 0)
    return set_error(cudaErrorInvalidValue, "ep_ipc_finish: need R > 0, nbytes >= 0, epoch > 0");
  cudaStream_t s = as_stream(stream);
  const char* data = static_cast<const char*>(base) + header_bytes(R);
  if (nbytes > 0) {
    if (int err = check(cudaMemcpyAsync(out, data, size_t(nbytes), cudaMemcpyDeviceToDevice, s),
                        "ep_ipc_finish cudaMemcpyAsync"))
      return err;
  }
  consumed_kernel<<<1, 1, 0, s>>>(static_cast<uint64_t*>(base) + consumed_word(R), epoch);
  return check(cudaGetLastError(), "ep_ipc_finish launch");
}
