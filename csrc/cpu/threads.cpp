// fusedrnn: the number of threads a call may use.
//
// All parallel work runs on fusedrnn's own pool, or on the OpenMP runtime's
// threads when the process has one loaded (pool.h); the large GEMMs are split
// between the threads, each calling the wheel's OpenBLAS on its own
// part. OpenBLAS itself is therefore kept single-threaded: its idle threads
// would otherwise spin on the same cores as the recurrence.
#include <unistd.h>

#include <atomic>
#include <fstream>

#include <cblas.h>

#include "fusedrnn/rnn.h"

namespace fusedrnn {

namespace {
std::atomic<int> g_threads{1};

struct BlasSingleThreaded {
  BlasSingleThreaded() { scipy_openblas_set_num_threads(1); }
} g_blas_single_threaded;
}  // namespace

void set_num_threads(int n) { g_threads.store(n < 1 ? 1 : n); }
int get_num_threads() { return g_threads.load(); }

namespace {
std::atomic<int> g_tiled_mode{-1};
std::atomic<int64_t> g_tiled_steps{0};
std::atomic<int64_t> g_tiled_calls{0};
}  // namespace
void set_tiled_input(int mode, int64_t steps) {
  g_tiled_mode.store(mode < 0 ? -1 : mode > 0 ? 1 : 0);
  g_tiled_steps.store(steps > 0 ? steps : 0);
}
int tiled_input_mode() { return g_tiled_mode.load(); }
int64_t tiled_input_steps() { return g_tiled_steps.load(); }
int64_t tiled_input_calls() { return g_tiled_calls.load(); }
void count_tiled_input_call() { g_tiled_calls.fetch_add(1); }

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    long v = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (v > 0) return int64_t(v);
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index2/size");
    int64_t n = 0;
    char unit = 0;
    if (f >> n) {
      f >> unit;
      if (unit == 'K') n <<= 10;
      else if (unit == 'M') n <<= 20;
      return n;
    }
    return int64_t(0);
  }();
  return bytes;
}

}  // namespace fusedrnn
