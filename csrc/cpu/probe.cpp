// fusedrnn: machine ceilings for the benchmark (python -m fusedrnn bench).
//
// probe_fma_gflops: the multiply-add peak of the kernels' instruction set on
// n threads, from 12 independent register accumulators per thread.
// probe_stream_gbps: how fast n threads read a weight of a given size over
// and over, one multiply-add per value, each thread its own contiguous share,
// as the recurrence reads W_hh at batch 1; the threads meet only every 64
// passes, so no synchronisation cost is counted (a floor must be one).
// Both time the pool's threads as the layers use them and return the best
// of 5 samples: a ceiling, so the sample least disturbed by anything else.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

#include "fusedrnn/buffer.h"
#include "fusedrnn/rnn.h"
#include "kernels.h"
#include "pool.h"

namespace fusedrnn {

namespace {

using Clock = std::chrono::steady_clock;

std::atomic<float> g_sink{0.f};  // results land here, so no work is optimized away

double best(const std::vector<double>& rates) {
  return *std::max_element(rates.begin(), rates.end());
}

// Seconds for `rounds` rounds of work(tid, n) on n threads with a barrier
// after each round (and one before the first, so the clock starts together).
// *used: the threads that ran (1 when another call holds the pool).
template <typename Work>
double timed(int threads, int64_t rounds, const Work& work, int* used = nullptr) {
  double seconds = 0;
  const int n = ThreadPool::run(threads, [&](int tid, Team& team) {
    float s = 0;
    team.barrier();
    const auto t0 = Clock::now();
    for (int64_t r = 0; r < rounds; ++r) {
      s += work(tid, team.size());
      team.barrier();
    }
    if (tid == 0) seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    g_sink.store(s, std::memory_order_relaxed);
  });
  if (used) *used = n;
  return seconds;
}

// Rounds so that a sample lasts about `seconds` (at least 3 rounds). Also
// the warm-up: a sleeping second core or a cold clock makes the first
// milliseconds slow, so one more full sample runs before any is kept.
template <typename Work>
int64_t calibrate(int threads, double seconds, const Work& work) {
  int64_t rounds = 1;
  for (;;) {
    const double t = timed(threads, rounds, work);
    if (t >= seconds / 4 || rounds >= (int64_t(1) << 40)) {
      rounds = std::max<int64_t>(3, int64_t(double(rounds) * seconds / std::max(t, 1e-9)));
      timed(threads, rounds, work);
      return rounds;
    }
    rounds *= 4;
  }
}

void check_args(int threads, double seconds) {
  if (threads < 1 || threads > 256)
    throw std::invalid_argument("threads must be in [1, 256], got " + std::to_string(threads));
  if (!(seconds > 0) || seconds > 10)
    throw std::invalid_argument("seconds must be in (0, 10], got " + std::to_string(seconds));
}

}  // namespace

double probe_fma_gflops(int threads, double seconds) {
  check_args(threads, seconds);
  const Kernels<float>& K = kernels<float>();
  constexpr int64_t kIters = 4096;  // per round: 12 * 4096 vector multiply-adds
  auto work = [&](int, int) { return K.probe_fma(kIters, 0.999f); };
  const int64_t rounds = calibrate(threads, seconds, work);
  std::vector<double> rates;
  for (int i = 0; i < 5; ++i) {
    int used = 1;
    const double t = timed(threads, rounds, work, &used);
    rates.push_back(2.0 * 12 * kIters * K.lanes * double(rounds) * used / t / 1e9);
  }
  return best(rates);
}

double probe_stream_gbps(int64_t bytes, int threads, double seconds) {
  check_args(threads, seconds);
  if (bytes < int64_t(sizeof(float)) || bytes > (int64_t(1) << 32))
    throw std::invalid_argument("nbytes must be in [4, 2**32], got " + std::to_string(bytes));
  const Kernels<float>& K = kernels<float>();
  const int64_t n = bytes / int64_t(sizeof(float));
  Buffer<float> w(size_t(n) + 64);  // + 64: each share starts on a 64-byte boundary
  std::fill(w.data(), w.data() + n + 64, 1e-3f);
  // thread tid reads [n * tid / nt, n * (tid + 1) / nt), from an aligned start
  constexpr int kPasses = 64;  // per round; the threads meet between rounds
  auto work = [&](int tid, int nt) {
    const int64_t a = n * tid / nt, b = n * (tid + 1) / nt;
    float s = 0;
    for (int i = 0; i < kPasses; ++i) s += K.probe_stream(w.data() + a / 16 * 16, b - a, 0.5f);
    return s;
  };
  const int64_t rounds = calibrate(threads, seconds, work);
  std::vector<double> rates;
  for (int i = 0; i < 5; ++i)
    rates.push_back(double(n) * sizeof(float) * double(rounds) * kPasses /
                    timed(threads, rounds, work) / 1e9);
  return best(rates);
}

}  // namespace fusedrnn
