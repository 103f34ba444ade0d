// bench/overlap.cpp: can a batch-1 recurrent step hide compute under its W_hh stream?
//
// At B = 1 a step streams each thread's share of W_hh (one multiply-add per weight,
// memory-bound), and the input projection is a GEMM on cached data (compute-bound).
// If the core ran both at once, the input GEMM would cost nothing beside the steps.
// This probe times, per step and on every thread (a spinning barrier per step, as
// fusedrnn's steps):
//   stream   16 blocks of 256 x 4 gates x 8 floats (512 KiB) per thread, read once a
//            step with one FMA per 8 weights, 4 accumulators per block (the B = 1 tile)
//   compute  the same number of FMAs on 64 KiB of cached weights, 2 rows x 4 gates
//            (the input GEMM's kind of work)
//   serial   stream, then compute, block by block
//   mixed    both in one loop, instruction by instruction
// Build and run (x86-64 with AVX2/FMA):
//   g++ -O3 -mavx2 -mfma -pthread bench/overlap.cpp -o /tmp/overlap && /tmp/overlap
// On the 2-core development machine (README, "How close to the machine"), four runs of
// three rounds: stream 6.2-8.6, compute 3.7-4.0, serial 10.5-11.8, mixed 9.3-11.1 us
// a step (median 9.6). Mixed hides at most 0.6 us of the compute's 3.7 under the
// stream (against the best stream-only rounds): the loop is bound by its loads (20 per
// 16 FMAs), and with 16 vector registers the cached product cannot keep its weights
// in registers beside the stream's accumulators.
#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

constexpr int K = 256, NB = 16, STEPS = 2000;
enum Mode { kStream = 1, kCompute = 2, kSerial = 3, kMixed = 4 };

struct Barrier {
  std::atomic<int> arrived{0};
  int n;
  void wait(int& generation) {
    ++generation;
    arrived.fetch_add(1);
    while (arrived.load() < generation * n) _mm_pause();
  }
};

float* filled(size_t n, int mod) {
  float* p = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  for (size_t i = 0; i < n; ++i) p[i] = 1e-3f * float(i % mod);
  return p;
}

// One k of the stream: h[k] times the 4 gates' weights of a K x 4 x 8 panel.
inline void stream_k(__m256* acc, const float* wp, const float* h, int k) {
  const __m256 hb = _mm256_broadcast_ss(h + k);
  for (int g = 0; g < 4; ++g)
    acc[g] = _mm256_fmadd_ps(hb, _mm256_load_ps(wp + (k * 4 + g) * 8), acc[g]);
}

// One k of the cached product: 2 rows of x times the 4 gates' weights.
inline void cached_k(__m256* acc, const float* wq, const float* x, int k) {
  for (int r = 0; r < 2; ++r) {
    const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
    for (int g = 0; g < 4; ++g)
      acc[r * 4 + g] = _mm256_fmadd_ps(xb, _mm256_load_ps(wq + (k * 4 + g) * 8), acc[r * 4 + g]);
  }
}

__m256 sum(const __m256* acc, int n) {
  __m256 s = acc[0];
  for (int j = 1; j < n; ++j) s = _mm256_add_ps(s, acc[j]);
  return s;
}

// One block of the stream: h (K values) times a K x 4 x 8 panel.
__m256 stream_block(const float* wp, const float* h) {
  __m256 acc[4] = {};
  for (int k = 0; k < K; ++k) stream_k(acc, wp, h, k);
  return sum(acc, 4);
}

// As many FMAs on a cached panel: 2 rows of x over K/2 values of k.
__m256 compute_block(const float* wq, const float* x) {
  __m256 acc[8] = {};
  for (int k = 0; k < K / 2; ++k) cached_k(acc, wq, x, k);
  return sum(acc, 8);
}

// Both, interleaved: two k of the stream, then one k of the cached product.
__m256 mixed_block(const float* wp, const float* h, const float* wq, const float* x) {
  __m256 acc[12] = {};  // the stream's 4, then the cached product's 8
  for (int k = 0; k < K; k += 2) {
    stream_k(acc, wp, h, k);
    stream_k(acc, wp, h, k + 1);
    cached_k(acc + 4, wq, x, k / 2);
  }
  return sum(acc, 12);
}

double run(Mode mode, int threads) {
  Barrier bar;
  bar.n = threads;
  std::vector<double> us(threads);
  std::vector<float> sink(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      float* w = filled(size_t(K) * 32 * NB, 7);  // 512 KiB: streamed every step
      float* wq = filled(size_t(K) * 32 * 2, 5);  // 64 KiB: cached
      float* x = filled(size_t(K) * 2 * 5, 3);
      float h[K];
      for (float& v : h) v = 0.5f;
      int generation = 0;
      __m256 out = _mm256_setzero_ps();
      bar.wait(generation);
      const auto t0 = std::chrono::steady_clock::now();
      for (int s = 0; s < STEPS; ++s) {
        for (int b = 0; b < NB; ++b) {
          const float* wp = w + size_t(b) * K * 32;
          const float* wc = wq + (b & 1) * K * 32;
          const float* xr = x + (b % 5) * 2 * K;
          if (mode == kMixed) {
            out = _mm256_add_ps(out, mixed_block(wp, h, wc, xr));
            continue;
          }
          if (mode & kStream) out = _mm256_add_ps(out, stream_block(wp, h));
          if (mode & kCompute) out = _mm256_add_ps(out, compute_block(wc, xr));
        }
        h[s % K] += 1e-9f * _mm256_cvtss_f32(out);  // the next step depends on this one
        bar.wait(generation);
      }
      us[t] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
                  .count() / STEPS;
      sink[t] = _mm256_cvtss_f32(out);
      std::free(w);
      std::free(wq);
      std::free(x);
    });
  for (auto& th : pool) th.join();
  double worst = 0;
  for (double v : us) worst = v > worst ? v : worst;
  return worst + 0 * sink[0];
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const char* names[] = {"", "stream", "compute", "serial", "mixed"};
  for (int round = 0; round < 3; ++round) {
    std::printf("round %d, %d threads, us per step:", round + 1, threads);
    for (int m = kStream; m <= kMixed; ++m)
      std::printf("  %s %.2f", names[m], run(Mode(m), threads));
    std::printf("\n");
  }
}
