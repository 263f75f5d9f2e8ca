// Shared helpers of the .cu files: error reporting, stream casts, element-type dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>

#include "epruntime_cuda.h"

namespace ep {

// Records a message for ep_last_error_string() and returns code.
int set_error(int code, const char* fmt, ...);
// 0 after clearing the thread's message.
int ok();

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Checks a launch / runtime call and names the call site on failure.
inline int check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) return set_error(err, "%s: %s", what, cudaGetErrorString(err));
  return ok();
}

constexpr int kMaxGrid = 65535 * 8;  // grid-stride loops cap the launch size

inline int grid_for(int64_t n) {
  return static_cast<int>(n < 1 ? 1 : (n < kMaxGrid ? n : kMaxGrid));
}

// Float conversions of the row element types.
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

inline int elem_bytes(int dtype) {
  switch (dtype) {
    case EP_FLOAT32: return 4;
    case EP_BFLOAT16: return 2;
    case EP_FLOAT16: return 2;
    default: return 0;
  }
}

// Copies nbytes from src to dst with the widest access both pointers and the size allow
// (16-byte vectors where aligned), spread over the threads of one block.
__device__ __forceinline__ void block_copy(char* __restrict__ dst, const char* __restrict__ src,
                                           int64_t nbytes) {
  const auto a = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                 static_cast<uintptr_t>(nbytes);
  if ((a & 15) == 0) {
    auto* d = reinterpret_cast<uint4*>(dst);
    const auto* s = reinterpret_cast<const uint4*>(src);
    for (int64_t i = threadIdx.x; i < nbytes / 16; i += blockDim.x) d[i] = s[i];
  } else if ((a & 3) == 0) {
    auto* d = reinterpret_cast<uint32_t*>(dst);
    const auto* s = reinterpret_cast<const uint32_t*>(src);
    for (int64_t i = threadIdx.x; i < nbytes / 4; i += blockDim.x) d[i] = s[i];
  } else if ((a & 1) == 0) {
    auto* d = reinterpret_cast<uint16_t*>(dst);
    const auto* s = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = threadIdx.x; i < nbytes / 2; i += blockDim.x) d[i] = s[i];
  } else {
    for (int64_t i = threadIdx.x; i < nbytes; i += blockDim.x) dst[i] = src[i];
  }
}

}  // namespace ep
