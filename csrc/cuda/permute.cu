// permute (token rows -> per-rank blocks of the send buffer) and unpermute_combine (weighted sum
// of a token's returned rows in ascending rank order). One block per token; rows are moved with
// 16-byte vector accesses where the pointers and the row size allow.
#include "common.cuh"

namespace ep {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxRanks = 2048;  // bounds the per-block shared memory (R * 20 bytes)

// offset_R[r] = exclusive prefix sum of tokens_per_rank (block-shared; R is small).
__device__ void load_offsets(const int64_t* __restrict__ tokens_per_rank_R, int64_t R,
                             int64_t* offset_R) {
  if (threadIdx.x == 0) {
    int64_t run = 0;
    for (int64_t r = 0; r < R; ++r) {
      offset_R[r] = run;
      run += tokens_per_rank_R[r];
    }
  }
  __syncthreads();
}

__global__ void permute_kernel(const char* __restrict__ x,
                               const bool* __restrict__ token_in_rank_TR,
                               const int64_t* __restrict__ position_TR,
                               const int64_t* __restrict__ tokens_per_rank_R, int64_t T, int64_t R,
                               int64_t row_bytes, char* __restrict__ rows) {
  extern __shared__ int64_t offset_R[];
  load_offsets(tokens_per_rank_R, R, offset_R);
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t r = 0; r < R; ++r) {
      if (!token_in_rank_TR[t * R + r]) continue;
      const int64_t n = offset_R[r] + position_TR[t * R + r];
      block_copy(rows + n * row_bytes, x + t * row_bytes, row_bytes);
    }
  }
}

// v rounded to Elem and back (the identity for float).
template <typename Elem> __device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<Elem>(v));
}

// V elements per thread step: V > 1 only when every row start is 16-byte aligned.
template <typename Elem, int V>
__global__ void combine_kernel(const Elem* __restrict__ rows,
                               const bool* __restrict__ token_in_rank_TR,
                               const int64_t* __restrict__ position_TR,
                               const int64_t* __restrict__ tokens_per_rank_R,
                               const float* __restrict__ weight_TR, int64_t T, int64_t R, int64_t H,
                               Elem* __restrict__ out) {
  extern __shared__ int64_t smem[];
  int64_t* offset_R = smem;
  int64_t* src_R = smem + R;  // row of rank r's copy of token t, -1 if none
  float* w_R = reinterpret_cast<float*>(smem + 2 * R);
  load_offsets(tokens_per_rank_R, R, offset_R);
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
      const bool in = token_in_rank_TR[t * R + r];
      src_R[r] = in ? offset_R[r] + position_TR[t * R + r] : -1;
      w_R[r] = weight_TR != nullptr ? weight_TR[t * R + r] : 1.0f;
    }
    __syncthreads();
    for (int64_t h0 = int64_t(threadIdx.x) * V; h0 < H; h0 += int64_t(blockDim.x) * V) {
      float acc[V];
      for (int i = 0; i < V; ++i) acc[i] = 0.0f;
      for (int64_t r = 0; r < R; ++r) {  // ascending r: the reference's summation order
        if (src_R[r] < 0) continue;
        alignas(16) Elem v[V];
        const Elem* src = rows + src_R[r] * H + h0;
        if constexpr (V > 1) {
          *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(src);
        } else {
          v[0] = *src;
        }
        // As the reference (torch's index_add for 16-bit rows): each product is rounded to the
        // row dtype, the running sum stays float32 and is rounded once when stored; _rn
        // intrinsics so no FMA contraction changes the bits.
        for (int i = 0; i < V; ++i) {
          const float prod = round_to<Elem>(__fmul_rn(w_R[r], to_float(v[i])));
          acc[i] = __fadd_rn(acc[i], prod);
        }
      }
      alignas(16) Elem res[V];
      for (int i = 0; i < V; ++i) res[i] = from_float<Elem>(acc[i]);
      if constexpr (V > 1) {
        *reinterpret_cast<uint4*>(out + t * H + h0) = *reinterpret_cast<const uint4*>(res);
      } else {
        out[t * H + h0] = res[0];
      }
    }
    __syncthreads();  // src_R / w_R are rewritten for the next token
  }
}

template <typename Elem>
int launch_combine(const void* rows, const bool* tir, const int64_t* pos, const int64_t* tpr,
                   const float* w, int64_t T, int64_t R, int64_t H, void* out, cudaStream_t s) {
  constexpr int V = 16 / sizeof(Elem);
  const size_t smem = size_t(R) * (2 * sizeof(int64_t) + sizeof(float));
  const bool vec = H % V == 0 && (reinterpret_cast<uintptr_t>(rows) % 16) == 0 &&
                   (reinterpret_cast<uintptr_t>(out) % 16) == 0;
  if (vec)
    combine_kernel<Elem, V><<<grid_for(T), kThreads, smem, s>>>(
        static_cast<const Elem*>(rows), tir, pos, tpr, w, T, R, H, static_cast<Elem*>(out));
  else
    combine_kernel<Elem, 1><<<grid_for(T), kThreads, smem, s>>>(
        static_cast<const Elem*>(rows), tir, pos, tpr, w, T, R, H, static_cast<Elem*>(out));
  return check(cudaGetLastError(), "ep_unpermute_combine launch");
}

int check_shape(const char* fn, int64_t T, int64_t R, int64_t H, int dtype) {
  if (T < 0 || R <= 0 || H < 0)
    return set_error(cudaErrorInvalidValue, "%s: need T >= 0, R > 0, H >= 0 (got %lld, %lld, %lld)",
                     fn, (long long)T, (long long)R, (long long)H);
  if (R > kMaxRanks)
    return set_error(cudaErrorInvalidValue, "%s: num_ranks %lld exceeds %lld", fn, (long long)R,
                     (long long)kMaxRanks);
  if (elem_bytes(dtype) == 0)
    return set_error(cudaErrorInvalidValue, "%s: unknown dtype code %d", fn, dtype);
  return ok();
}

}  // namespace
}  // namespace ep

extern "C" int ep_permute(const void* x_TH, const bool* token_in_rank_TR,
                          const int64_t* position_TR,
                          const int64_t* tokens_per_rank_R, int64_t T, int64_t R, int64_t row_bytes,
                          void* rows_NH, void* stream) {
  using namespace ep;
  // Rows are copied as bytes: any dtype works.
  if (int err = check_shape("ep_permute", T, R, row_bytes, EP_FLOAT32)) return err;
  if (T == 0 || row_bytes == 0) return ok();
  permute_kernel<<<grid_for(T), kThreads, size_t(R) * sizeof(int64_t), as_stream(stream)>>>(
      static_cast<const char*>(x_TH), token_in_rank_TR, position_TR, tokens_per_rank_R, T, R,
      row_bytes, static_cast<char*>(rows_NH));
  return check(cudaGetLastError(), "ep_permute launch");
}

extern "C" int ep_unpermute_combine(const void* rows_NH, const bool* token_in_rank_TR,
                                    const int64_t* position_TR, const int64_t* tokens_per_rank_R,
                                    const float* weight_TR, int64_t T, int64_t R, int64_t H,
                                    int dtype, void* out_TH, void* stream) {
  using namespace ep;
  if (int err = check_shape("ep_unpermute_combine", T, R, H, dtype)) return err;
  if (T == 0 || H == 0) return ok();
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case EP_FLOAT32:
      return launch_combine<float>(rows_NH, token_in_rank_TR, position_TR, tokens_per_rank_R,
                                   weight_TR, T, R, H, out_TH, s);
    case EP_BFLOAT16:
      return launch_combine<__nv_bfloat16>(rows_NH, token_in_rank_TR, position_TR,
                                           tokens_per_rank_R, weight_TR, T, R, H, out_TH, s);
    default:
      return launch_combine<__half>(rows_NH, token_in_rank_TR, position_TR, tokens_per_rank_R,
                                    weight_TR, T, R, H, out_TH, s);
  }
}
