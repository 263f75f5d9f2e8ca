// FastMMoE's greedy redundancy selection (epruntime.fastmmoe.policies): per sample, drop the
// visual token most similar to another remaining token (its redundancy), first index on ties,
// until `keep` remain. Must match epruntime/kernels/reference.py::greedy_keep exactly.
//
// Lazy greedy: a token's redundancy only falls as others leave, so a cached value is an upper
// bound. A max-heap holds (cached redundancy, token, nearest neighbour it was computed with);
// the top is dropped if that neighbour is still there (then its value is exact and no other
// token's exact value can beat it, ties included: the heap orders equal values by index), else
// its row is rescanned and pushed back. Each rescan is one row; most tokens never need one, so
// a sample costs about O(P^2) (the first scan) instead of O(P^3).

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

struct Entry {
  float value;
  int64_t token;
  int64_t nearest;  // -1: no other token remained
};

// Heap order: higher value first, then lower token index (the first index wins a tie).
inline bool below(const Entry& a, const Entry& b) {
  return a.value < b.value || (a.value == b.value && a.token > b.token);
}

// Max of row i over alive j != i and the index where it is (-inf, -1 when none is alive).
inline Entry scan(const float* row, const std::vector<char>& alive, int64_t p, int64_t i) {
  Entry e{-std::numeric_limits<float>::infinity(), i, -1};
  for (int64_t j = 0; j < p; ++j) {
    if (j == i || !alive[j]) continue;
    if (e.nearest < 0 || row[j] > e.value) {
      e.value = row[j];
      e.nearest = j;
    }
  }
  return e;
}

}  // namespace

extern "C" {

// sim [B, P, P] float32 (row-major), 0 < keep < P -> keep_out [B, keep] int64 ascending.
void ep_cpu_greedy_keep(const float* sim, int64_t b, int64_t p, int64_t keep, int64_t* keep_out) {
  std::vector<char> alive(p);
  std::vector<Entry> heap;
  heap.reserve(p);
  for (int64_t s = 0; s < b; ++s) {
    const float* m = sim + s * p * p;
    std::fill(alive.begin(), alive.end(), 1);
    heap.clear();
    for (int64_t i = 0; i < p; ++i) heap.push_back(scan(m + i * p, alive, p, i));
    std::make_heap(heap.begin(), heap.end(), below);
    for (int64_t dropped = 0; dropped < p - keep;) {
      std::pop_heap(heap.begin(), heap.end(), below);
      Entry top = heap.back();
      heap.pop_back();
      if (top.nearest < 0 || alive[top.nearest]) {  // exact: drop it
        alive[top.token] = 0;
        ++dropped;
      } else {  // its neighbour left: rescan and queue again
        heap.push_back(scan(m + top.token * p, alive, p, top.token));
        std::push_heap(heap.begin(), heap.end(), below);
      }
    }
    int64_t* out = keep_out + s * keep;
    for (int64_t i = 0, k = 0; i < p; ++i)
      if (alive[i]) out[k++] = i;
  }
}

}  // extern "C"
