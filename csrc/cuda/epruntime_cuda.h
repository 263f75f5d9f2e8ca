// C ABI of libepruntime_cuda.so: the dispatch-layout, permute, unpermute-combine and compact
// kernels and the CUDA-IPC intra-node all-to-all. No torch headers: the library is built by
// nvcc alone and loaded with ctypes (epruntime/kernels/cuda.py, epruntime/transport/cuda_ipc.py).
//
// Conventions: every pointer is a device pointer unless named *_host; tensors are contiguous,
// row-major; `stream` is a cudaStream_t passed as void* (NULL = legacy default stream). Every
// entry point returns a cudaError_t as int (0 = success); on failure ep_last_error_string()
// describes the last error of the calling thread, naming the argument at fault.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types of the row ops (x, rows, out).
enum ep_dtype { EP_FLOAT32 = 0, EP_BFLOAT16 = 1, EP_FLOAT16 = 2 };

const char* ep_last_error_string(void);
int ep_abi_version(void);
// 0 if the library's CUDA runtime works with this host's driver; *device_count_host GPUs.
int ep_runtime_check(int* device_count_host);

// routing_map_TE bool [T, E], rank_of_expert_E int64 [E] (values in [0, R)) ->
// token_in_rank_TR bool [T, R], position_TR int64 [T, R] (-1 where not sent),
// tokens_per_rank_R int64 [R], tokens_per_expert_E int64 [E].
int ep_dispatch_layout(const bool* routing_map_TE, const int64_t* rank_of_expert_E, int64_t T,
                       int64_t E, int64_t R, bool* token_in_rank_TR, int64_t* position_TR,
                       int64_t* tokens_per_rank_R, int64_t* tokens_per_expert_E, void* stream);

// x_TH [T, row_bytes] (any dtype, as bytes) -> rows_NH [N, row_bytes]:
// rows[offset(r) + position[t, r]] = x[t] for every token_in_rank[t, r]; offset = exclusive
// prefix sum of tokens_per_rank.
int ep_permute(const void* x_TH, const bool* token_in_rank_TR, const int64_t* position_TR,
               const int64_t* tokens_per_rank_R, int64_t T, int64_t R, int64_t row_bytes,
               void* rows_NH, void* stream);

// rows_NH [N, H] of dtype, weight_TR float32 [T, R] or NULL (= 1; values must already be
// representable in dtype) -> out_TH [T, H]: out[t] = sum over r ascending with
// token_in_rank[t, r] of w[t, r] * rows[offset(r) + position[t, r]], starting from zero, every
// product rounded to dtype, the sum kept in float32 and rounded once (the torch reference's
// arithmetic, bit for bit).
int ep_unpermute_combine(const void* rows_NH, const bool* token_in_rank_TR,
                         const int64_t* position_TR, const int64_t* tokens_per_rank_R,
                         const float* weight_TR, int64_t T, int64_t R, int64_t H, int dtype,
                         void* out_TH, void* stream);

// Bytes of scratch ep_compact_index needs for T flags.
int ep_compact_workspace_bytes(int64_t T, size_t* bytes_host);
// keep_T bool [T] -> index_T int64 [T] (first *count entries: kept indices, ascending),
// count_1 int64 [1] (on the device).
int ep_compact_index(const bool* keep_T, int64_t T, int64_t* index_T, int64_t* count_1,
                     void* workspace, size_t workspace_bytes, void* stream);
// src [*, row_bytes] (bytes), index_K int64 [K] -> dst [K, row_bytes]: dst[k] = src[index[k]].
int ep_gather_rows(const void* src, const int64_t* index_K, int64_t K, int64_t row_bytes,
                   void* dst, void* stream);

// ---- CUDA-IPC intra-node all-to-all --------------------------------------------------------
// Each rank owns one IPC buffer: a header of flags (ep_ipc_header_bytes(R), zeroed by
// ep_ipc_alloc) then data_bytes of receive space. Peers map it with the 64-byte
// cudaIpcMemHandle_t written to handle_host. Epochs count calls from 1, the same on every rank.
int ep_ipc_handle_bytes(void);
int64_t ep_ipc_header_bytes(int64_t R);
int ep_ipc_alloc(int64_t R, int64_t data_bytes, void** base_host, void* handle_host);
int ep_ipc_free(void* base);
int ep_ipc_open(const void* handle_host, void** base_host);
int ep_ipc_close(void* base);
// Sender `src_rank` (whose own buffer is own_base) copies nbytes from src into the receive space
// of `dst_rank` (mapped at peer_base) at dst_offset once that rank has consumed epoch - 1, then
// marks ready[src_rank] = epoch there. Waits trap after timeout_ms (0: never).
int ep_ipc_send(const void* src, int64_t nbytes, void* own_base, void* peer_base, int64_t R,
                int64_t dst_offset, int64_t src_rank, int64_t dst_rank, uint64_t epoch,
                int64_t timeout_ms, void* stream);
// Blocks `stream` until every sender has marked epoch in base's header (trap after timeout_ms).
int ep_ipc_wait(void* base, int64_t R, uint64_t epoch, int64_t timeout_ms, void* stream);
// Copies nbytes of received data to out, then marks epoch consumed so senders may reuse it.
int ep_ipc_finish(void* base, int64_t R, void* out, int64_t nbytes, uint64_t epoch, void* stream);

#ifdef __cplusplus
}
#endif
