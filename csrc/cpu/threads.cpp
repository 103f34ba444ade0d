// fusedrnn: the number of threads a call may use.
//
// All parallel work runs on fusedrnn's own pool, or on the OpenMP runtime's
// threads when the process has one loaded (pool.h); the large GEMMs are split
// between the threads, each calling the wheel's OpenBLAS on its own
// part. OpenBLAS itself is therefore kept single-threaded: its idle threads
// would otherwise spin on the same cores as the recurrence.
#include <atomic>

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

}  // namespace fusedrnn
