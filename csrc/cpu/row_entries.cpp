// Row entries of the rank-dedup dispatch (epruntime.dispatch.plan / layout): which local expert
// slots a row feeds, and the expert rank's fan-out of received rows to its experts. Both are a
// few thousand small integers per layer: a loop here costs microseconds, where torch's sort on
// CPU costs hundreds (issue 18: this was most of the dedup dispatcher's "permute" time).
// Must match epruntime/kernels/reference.py::row_slots / fan_out_order exactly.

#include <cstdint>
#include <cstring>
#include <vector>

extern "C" {

// used [G_total, Q] bool bytes (row-major; row = token * groups + group), token_N / group_N [N]
// -> slot_NM [N, M]: the first M used slots of each row in ascending order, -1 padded.
// Returns 0, or 1 + n for the first row n whose token or group is out of range.
int64_t ep_cpu_row_slots(const uint8_t* used, int64_t tokens, int64_t groups, int64_t slots,
                         const int64_t* token_N, const int64_t* group_N, int64_t rows,
                         int64_t max_entries, int64_t* slot_NM) {
  // A row uses few of its slots: scan 8 slots per load and skip the empty words.
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t t = token_N[n], g = group_N[n];
    if (t < 0 || t >= tokens || g < 0 || g >= groups) return 1 + n;
    const uint8_t* u = used + (t * groups + g) * slots;
    int64_t* out = slot_NM + n * max_entries;
    int64_t m = 0, q = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; q + 8 <= slots && m < max_entries; q += 8) {
      uint64_t w;
      std::memcpy(&w, u + q, 8);
      while (w && m < max_entries) {
        const int byte = __builtin_ctzll(w) >> 3;  // the lowest used slot of the word
        out[m++] = q + byte;
        w &= ~(0xFFull << (byte * 8));
      }
    }
#endif
    for (; q < slots && m < max_entries; ++q)
      if (u[q]) out[m++] = q;
    for (; m < max_entries; ++m) out[m] = -1;
  }
  return 0;
}

// slot_XM [X * M] (-1 = unused) -> entry_K: the flat indices of the used entries ordered by slot,
// arrival order within a slot (a stable counting sort), tokens_per_slot [L]. Returns K, or -1 if
// a slot is >= L.
int64_t ep_cpu_fan_out(const int64_t* slot, int64_t entries, int64_t num_local,
                       int64_t* entry_K, int64_t* tokens_per_slot) {
  std::memset(tokens_per_slot, 0, sizeof(int64_t) * num_local);
  for (int64_t i = 0; i < entries; ++i) {
    const int64_t s = slot[i];
    if (s >= num_local) return -1;
    if (s >= 0) ++tokens_per_slot[s];
  }
  // Exclusive prefix sum: the next free position of each slot.
  std::vector<int64_t> next(num_local);
  int64_t total = 0;
  for (int64_t s = 0; s < num_local; ++s) {
    next[s] = total;
    total += tokens_per_slot[s];
  }
  for (int64_t i = 0; i < entries; ++i)
    if (slot[i] >= 0) entry_K[next[slot[i]]++] = i;
  return total;
}

}  // extern "C"
