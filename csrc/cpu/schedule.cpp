// fusedrnn: which rows run at each time step (variable lengths).
#include <algorithm>
#include <numeric>

#include "fusedrnn/rnn.h"

namespace fusedrnn {

void Schedule::build(int64_t T_, int64_t B_, const int64_t* lengths) {
  T = T_;
  B = B_;
  perm.resize(size_t(B));
  std::iota(perm.begin(), perm.end(), int64_t(0));
  count.assign(size_t(T), B);
  offset.resize(size_t(T));
  identity = lengths == nullptr;
  if (lengths) {
    // Longest rows first; ties keep batch order so results do not depend on sorting.
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
    int64_t j = B;
    for (int64_t t = 0; t < T; ++t) {
      while (j > 0 && lengths[perm[size_t(j - 1)]] <= t) --j;
      count[size_t(t)] = j;
    }
    identity = std::all_of(count.begin(), count.end(), [&](int64_t n) { return n == B; }) &&
               std::is_sorted(perm.begin(), perm.end());
  }
  N = 0;
  for (int64_t t = 0; t < T; ++t) {
    offset[size_t(t)] = N;
    N += count[size_t(t)];
  }
}

}  // namespace fusedrnn
