// fusedrnn: the number of threads a call may use.
#include <atomic>
#include <mutex>

#include <cblas.h>

#include "fusedrnn/rnn.h"

namespace fusedrnn {

namespace {
std::atomic<int> g_threads{1};
}

void set_num_threads(int n) { g_threads.store(n < 1 ? 1 : n); }
int get_num_threads() { return g_threads.load(); }

// The wheel's OpenBLAS (a pthreads build) only has a process-wide thread
// count, shared with SciPy, which links the same library. It is changed only
// when it differs from fusedrnn's setting, under a lock, so concurrent calls
// with one setting never touch it.
BlasThreadScope::BlasThreadScope() : saved_(get_num_threads()) {
  static std::mutex lock;
  if (scipy_openblas_get_num_threads() != saved_) {
    std::lock_guard<std::mutex> guard(lock);
    if (scipy_openblas_get_num_threads() != saved_) scipy_openblas_set_num_threads(saved_);
  }
}
BlasThreadScope::~BlasThreadScope() = default;

}  // namespace fusedrnn
