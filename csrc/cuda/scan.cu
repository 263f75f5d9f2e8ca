// The scans over tokens, in one translation unit because CUB's headers are most of the build
// time. Dispatch layout: which ranks each token goes to, its row within each rank's block of
// the send buffer (a per-rank exclusive scan over tokens) and the per-rank / per-expert counts.
// Compaction: indices of the kept tokens in their original order, by a three-pass scan
// (per-tile counts, one block scanning the tile counts, per-tile block scans writing the
// indices), and a row gather.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace ep {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // tokens per thread per scan tile
constexpr int kTile = kThreads * kItems;
constexpr int kGatherThreads = 128;

// ---- dispatch layout ----------------------------------------------------------------------------
// token_in_rank[t, r] = any e with routing[t, e] and rank_of_expert[e] == r. One thread per token.
__global__ void token_in_rank_kernel(const bool* __restrict__ routing_TE,
                                     const int64_t* __restrict__ rank_of_expert_E, int64_t T,
                                     int64_t E, int64_t R, bool* __restrict__ token_in_rank_TR) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < T;
       t += int64_t(gridDim.x) * blockDim.x) {
    bool* row = token_in_rank_TR + t * R;
    for (int64_t r = 0; r < R; ++r) row[r] = false;
    const bool* route = routing_TE + t * E;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r = rank_of_expert_E[e];
      if (route[e] && r >= 0 && r < R) row[r] = true;
    }
  }
}

// tokens_per_expert[e] = sum over t of routing[t, e]. One block per expert.
__global__ void tokens_per_expert_kernel(const bool* __restrict__ routing_TE, int64_t T,
                                         int64_t E, int64_t* __restrict__ tokens_per_expert_E) {
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  for (int64_t e = blockIdx.x; e < E; e += gridDim.x) {
    int64_t count = 0;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) count += routing_TE[t * E + e] ? 1 : 0;
    const int64_t total = Reduce(tmp).Sum(count);
    if (threadIdx.x == 0) tokens_per_expert_E[e] = total;
    __syncthreads();  // tmp is reused by the next expert
  }
}

// position[t, r] = number of tokens before t sent to r (-1 if t is not sent to r);
// tokens_per_rank[r] = number sent to r. One block per rank scans the tokens tile by tile.
__global__ void position_kernel(const bool* __restrict__ token_in_rank_TR, int64_t T, int64_t R,
                                int64_t* __restrict__ position_TR,
                                int64_t* __restrict__ tokens_per_rank_R) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    int64_t carry = 0;  // tokens of earlier tiles sent to r
    for (int64_t base = 0; base < T; base += kTile) {
      int in[kItems], before[kItems];
      for (int i = 0; i < kItems; ++i) {
        const int64_t t = base + threadIdx.x * kItems + i;
        in[i] = (t < T && token_in_rank_TR[t * R + r]) ? 1 : 0;
      }
      int tile_total;
      Scan(tmp).ExclusiveSum(in, before, tile_total);
      for (int i = 0; i < kItems; ++i) {
        const int64_t t = base + threadIdx.x * kItems + i;
        if (t < T) position_TR[t * R + r] = in[i] ? carry + before[i] : -1;
      }
      carry += tile_total;
      __syncthreads();  // tmp is reused by the next tile
    }
    if (threadIdx.x == 0) tokens_per_rank_R[r] = carry;
  }
}

// ---- compaction -------------------------------------------------------------------------------

int64_t num_tiles(int64_t T) { return (T + kTile - 1) / kTile; }

// tile_count[b] = kept flags in tile b.
__global__ void tile_count_kernel(const bool* __restrict__ keep_T, int64_t T,
                                  int64_t* __restrict__ tile_count) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t base = int64_t(blockIdx.x) * kTile;
  int n = 0;
  for (int i = 0; i < kItems; ++i) {
    const int64_t t = base + threadIdx.x * kItems + i;
    n += (t < T && keep_T[t]) ? 1 : 0;
  }
  const int total = Reduce(tmp).Sum(n);
  if (threadIdx.x == 0) tile_count[blockIdx.x] = total;
}

// tile_count -> exclusive prefix in place; count_1 = total. One block.
__global__ void tile_scan_kernel(int64_t* __restrict__ tile_count, int64_t tiles,
                                 int64_t* __restrict__ count_1) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int64_t carry = 0;
  for (int64_t base = 0; base < tiles; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < tiles ? tile_count[i] : 0;
    int64_t before, total;
    Scan(tmp).ExclusiveSum(v, before, total);
    if (i < tiles) tile_count[i] = carry + before;
    carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) *count_1 = carry;
}

__global__ void tile_write_kernel(const bool* __restrict__ keep_T, int64_t T,
                                  const int64_t* __restrict__ tile_offset,
                                  int64_t* __restrict__ index_T) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t base = int64_t(blockIdx.x) * kTile;
  int in[kItems], before[kItems];
  for (int i = 0; i < kItems; ++i) {
    const int64_t t = base + threadIdx.x * kItems + i;
    in[i] = (t < T && keep_T[t]) ? 1 : 0;
  }
  Scan(tmp).ExclusiveSum(in, before);
  for (int i = 0; i < kItems; ++i)
    if (in[i]) index_T[tile_offset[blockIdx.x] + before[i]] = base + threadIdx.x * kItems + i;
}

__global__ void gather_rows_kernel(const char* __restrict__ src,
                                   const int64_t* __restrict__ index_K,
                                   int64_t K, int64_t row_bytes, char* __restrict__ dst) {
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x)
    block_copy(dst + k * row_bytes, src + index_K[k] * row_bytes, row_bytes);
}

}  // namespace
}  // namespace ep

extern "C" int ep_dispatch_layout(const bool* routing_map_TE, const int64_t* rank_of_expert_E,
                                  int64_t T, int64_t E, int64_t R, bool* token_in_rank_TR,
                                  int64_t* position_TR, int64_t* tokens_per_rank_R,
                                  int64_t* tokens_per_expert_E, void* stream) {
  using namespace ep;
  if (T < 0 || E < 0 || R <= 0)
    return set_error(cudaErrorInvalidValue,
                     "ep_dispatch_layout: need T >= 0, E >= 0, num_ranks > 0 "
                     "(got %lld, %lld, %lld)",
                     (long long)T, (long long)E, (long long)R);
  cudaStream_t s = as_stream(stream);
  if (T > 0)
    token_in_rank_kernel<<<grid_for((T + kThreads - 1) / kThreads), kThreads, 0, s>>>(
        routing_map_TE, rank_of_expert_E, T, E, R, token_in_rank_TR);
  if (E > 0)
    tokens_per_expert_kernel<<<grid_for(E), kThreads, 0, s>>>(routing_map_TE, T, E,
                                                               tokens_per_expert_E);
  position_kernel<<<grid_for(R), kThreads, 0, s>>>(token_in_rank_TR, T, R, position_TR,
                                                    tokens_per_rank_R);
  return check(cudaGetLastError(), "ep_dispatch_layout launch");
}

extern "C" int ep_compact_workspace_bytes(int64_t T, size_t* bytes_host) {
  using namespace ep;
  if (T < 0) return set_error(cudaErrorInvalidValue, "ep_compact_workspace_bytes: T < 0");
  *bytes_host = size_t(num_tiles(T)) * sizeof(int64_t);
  return ok();
}

extern "C" int ep_compact_index(const bool* keep_T, int64_t T, int64_t* index_T,
                                int64_t* count_1, void* workspace, size_t workspace_bytes,
                                void* stream) {
  using namespace ep;
  size_t need = 0;
  if (int err = ep_compact_workspace_bytes(T, &need)) return err;
  if (workspace_bytes < need)
    return set_error(cudaErrorInvalidValue, "ep_compact_index: workspace of %zu bytes < %zu needed",
                     workspace_bytes, need);
  cudaStream_t s = as_stream(stream);
  const int64_t tiles = num_tiles(T);
  if (tiles > kMaxGrid)
    return set_error(cudaErrorInvalidValue, "ep_compact_index: T = %lld is too large",
                     (long long)T);
  auto* tile_offset = static_cast<int64_t*>(workspace);
  if (tiles > 0) tile_count_kernel<<<int(tiles), kThreads, 0, s>>>(keep_T, T, tile_offset);
  tile_scan_kernel<<<1, kThreads, 0, s>>>(tile_offset, tiles, count_1);
  if (tiles > 0)
    tile_write_kernel<<<int(tiles), kThreads, 0, s>>>(keep_T, T, tile_offset, index_T);
  return check(cudaGetLastError(), "ep_compact_index launch");
}

extern "C" int ep_gather_rows(const void* src, const int64_t* index_K, int64_t K,
                              int64_t row_bytes, void* dst, void* stream) {
  using namespace ep;
  if (K < 0 || row_bytes < 0)
    return set_error(cudaErrorInvalidValue, "ep_gather_rows: need K >= 0 and row_bytes >= 0");
  if (K == 0 || row_bytes == 0) return ok();
  gather_rows_kernel<<<grid_for(K), kGatherThreads, 0, as_stream(stream)>>>(
      static_cast<const char*>(src), index_K, K, row_bytes, static_cast<char*>(dst));
  return check(cudaGetLastError(), "ep_gather_rows launch");
}
