// Fast CPU dispatch kernels: layout, permute (row copies), unpermute-combine, compaction.
//
// Plain extern "C" functions on raw pointers (loaded with ctypes by epruntime/kernels/cpu.py;
// no torch headers). They must match epruntime/kernels/reference.py bit for bit, so the
// combine adds in ascending rank order with the reference's roundings, and the
// build uses -ffp-contract=off (a fused multiply-add would skip the product's rounding).
// 16-bit rows: products rounded to the row dtype, sums in float32, one rounding at the end.
// Single-threaded: one thread per rank is how ranks run.

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

// Row copy; `stream` = non-temporal stores when the buffer is larger than the caches (skips
// reading the destination lines first, as glibc's memcpy does for large copies).
inline void copy_row(char* dst, const char* src, int64_t bytes, bool stream) {
#if defined(__SSE2__)
  if (stream && bytes % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    for (int64_t i = 0; i < bytes; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, bytes);
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// bfloat16 <-> float, round to nearest even (as torch's c10::BFloat16).
inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}

inline uint16_t f32_to_f16(float f) {
  _Float16 h = static_cast<_Float16>(f);  // IEEE round to nearest even
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

// out_TH = sum over r ascending of w[t, r] * row(t, r) for 16-bit rows: each product rounded to
// the row dtype, the sum kept in float32 and rounded once (torch's index_add for 16-bit types).
template <class T, float (*Load)(T), T (*Store)(float)>
void combine_16(const T* rows, const int64_t* position_TR, const int64_t* offset_R, int64_t tokens,
                int64_t ranks, int64_t hidden, const T* weight_TR, T* out) {
  std::vector<float> acc(hidden);
  for (int64_t t = 0; t < tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t r = 0; r < ranks; ++r) {
      const int64_t p = position_TR[t * ranks + r];
      if (p < 0) continue;
      const T* src = rows + (offset_R[r] + p) * hidden;
      if (weight_TR) {
        const float w = Load(weight_TR[t * ranks + r]);
        for (int64_t h = 0; h < hidden; ++h) acc[h] = acc[h] + Load(Store(w * Load(src[h])));
      } else {
        for (int64_t h = 0; h < hidden; ++h) acc[h] = acc[h] + Load(src[h]);
      }
    }
    T* o = out + t * hidden;
    for (int64_t h = 0; h < hidden; ++h) o[h] = Store(acc[h]);
  }
}

inline float load_bf16(uint16_t b) { return bf16_to_f32(b); }
inline uint16_t store_bf16(float f) { return f32_to_bf16(f); }
inline float load_f16(uint16_t b) { return f16_to_f32(b); }
inline uint16_t store_f16(float f) { return f32_to_f16(f); }

}  // namespace

extern "C" {

int ep_cpu_abi_version() { return 3; }

// routing_TE [T, E] bool bytes, rank_of_expert_E [E] -> token_in_rank_TR [T, R] bool bytes,
// position_TR [T, R] (-1 = not sent), tokens_per_rank_R [R], tokens_per_expert_E [E].
void ep_cpu_dispatch_layout(const uint8_t* routing_TE, int64_t tokens, int64_t experts,
                            const int64_t* rank_of_expert_E, int64_t ranks,
                            uint8_t* token_in_rank_TR, int64_t* position_TR,
                            int64_t* tokens_per_rank_R, int64_t* tokens_per_expert_E) {
  std::memset(tokens_per_rank_R, 0, sizeof(int64_t) * ranks);
  std::memset(tokens_per_expert_E, 0, sizeof(int64_t) * experts);
  for (int64_t t = 0; t < tokens; ++t) {
    const uint8_t* m = routing_TE + t * experts;
    uint8_t* in = token_in_rank_TR + t * ranks;
    std::memset(in, 0, ranks);
    for (int64_t e = 0; e < experts; ++e) {
      if (m[e]) {
        ++tokens_per_expert_E[e];
        in[rank_of_expert_E[e]] = 1;
      }
    }
    int64_t* pos = position_TR + t * ranks;
    for (int64_t r = 0; r < ranks; ++r) pos[r] = in[r] ? tokens_per_rank_R[r]++ : -1;
  }
}

// x [T, row_bytes] -> out [N, row_bytes]: one copy per (token, rank) row; x is read once.
void ep_cpu_permute(const char* x, int64_t tokens, int64_t row_bytes, const int64_t* position_TR,
                    const int64_t* offset_R, int64_t ranks, char* out, int stream) {
  for (int64_t t = 0; t < tokens; ++t) {
    const char* src = x + t * row_bytes;
    const int64_t* pos = position_TR + t * ranks;
    for (int64_t r = 0; r < ranks; ++r)
      if (pos[r] >= 0) copy_row(out + (offset_R[r] + pos[r]) * row_bytes, src, row_bytes, stream);
  }
  if (stream) store_fence();
}

// Sums a token's rows in a float row buffer (in cache), then writes the output row once.
void ep_cpu_combine_f32(const float* rows, const int64_t* position_TR, const int64_t* offset_R,
                        int64_t tokens, int64_t ranks, int64_t hidden, const float* weight_TR,
                        float* out, int stream) {
  std::vector<float> acc(hidden);
  for (int64_t t = 0; t < tokens; ++t) {
    float* a = acc.data();
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t r = 0; r < ranks; ++r) {
      const int64_t p = position_TR[t * ranks + r];
      if (p < 0) continue;
      const float* src = rows + (offset_R[r] + p) * hidden;
      if (weight_TR) {
        const float w = weight_TR[t * ranks + r];
        for (int64_t h = 0; h < hidden; ++h) a[h] = a[h] + w * src[h];
      } else {
        for (int64_t h = 0; h < hidden; ++h) a[h] = a[h] + src[h];
      }
    }
    copy_row(reinterpret_cast<char*>(out + t * hidden), reinterpret_cast<const char*>(a),
             hidden * static_cast<int64_t>(sizeof(float)), stream);
  }
  if (stream) store_fence();
}

void ep_cpu_combine_bf16(const uint16_t* rows, const int64_t* position_TR,
                         const int64_t* offset_R, int64_t tokens, int64_t ranks, int64_t hidden,
                         const uint16_t* weight_TR, uint16_t* out) {
  combine_16<uint16_t, load_bf16, store_bf16>(rows, position_TR, offset_R, tokens, ranks, hidden,
                                              weight_TR, out);
}

void ep_cpu_combine_f16(const uint16_t* rows, const int64_t* position_TR,
                        const int64_t* offset_R, int64_t tokens, int64_t ranks, int64_t hidden,
                        const uint16_t* weight_TR, uint16_t* out) {
  combine_16<uint16_t, load_f16, store_f16>(rows, position_TR, offset_R, tokens, ranks, hidden,
                                            weight_TR, out);
}

// Kept rows of x [T, row_bytes] into out [K, row_bytes] and their indices; returns K.
int64_t ep_cpu_compact(const char* x, int64_t tokens, int64_t row_bytes, const uint8_t* keep_T,
                       char* out, int64_t* index_K) {
  int64_t k = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    if (!keep_T[t]) continue;
    std::memcpy(out + k * row_bytes, x + t * row_bytes, row_bytes);
    index_K[k++] = t;
  }
  return k;
}

}  // extern "C"
