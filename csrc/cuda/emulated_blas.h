// fusedrnn: the emulator's stand-in for the cuBLAS entry points of
// cublas_dyn.h (included by cublas_dyn.cpp when FUSEDRNN_CUDA_EMULATE is
// defined). gemm follows cublasGemmEx's contract exactly: column-major
// matrices, op(A) m x k, op(B) k x n, leading dimensions in elements, float
// alpha/beta, float accumulation, C read only when beta != 0, and the result
// rounded once to C's type. Slow and simple on purpose: it is an oracle for
// the argument mapping of the real calls.
#pragma once

#include <mutex>
#include <stdexcept>
#include <string>

namespace fusedrnn {
namespace cuda {

namespace {

float load(const void* p, blas::Type t, long i) {
  switch (t) {
    case blas::R32F: return static_cast<const float*>(p)[i];
    case blas::R16F: return __half2float(static_cast<const __half*>(p)[i]);
    case blas::R16BF: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  throw std::invalid_argument("emulated gemm: unknown type");
}

void store(void* p, blas::Type t, long i, float v) {
  switch (t) {
    case blas::R32F: static_cast<float*>(p)[i] = v; return;
    case blas::R16F: static_cast<__half*>(p)[i] = __float2half_rn(v); return;
    case blas::R16BF: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); return;
  }
  throw std::invalid_argument("emulated gemm: unknown type");
}

std::mutex g_log_mutex;
std::vector<std::array<int64_t, 3>> g_log;

}  // namespace

std::vector<std::array<int64_t, 3>> take_gemm_log() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::vector<std::array<int64_t, 3>> out;
  out.swap(g_log);
  return out;
}

void load_cublas(const std::string&) {}
bool cublas_loaded() { return true; }
std::string cublas_path() { return "emulated"; }
blas::Handle cublas_handle(int) { return nullptr; }

void gemm(cudaStream_t, int, blas::Op ta, blas::Op tb, int64_t m, int64_t n, int64_t k,
          float alpha, const void* A, blas::Type at, long lda, const void* B, blas::Type bt,
          long ldb, float beta, void* C, blas::Type ct, long ldc) {
  if (m == 0 || n == 0) return;
  if (m > 0x7fffffff || n > 0x7fffffff || k > 0x7fffffff)
    throw std::runtime_error("a matrix dimension exceeds cuBLAS's int range (2^31 - 1)");
  // cuBLAS's argument rules (an error status there): checked here so a wrong
  // mapping fails loudly instead of reading out of bounds.
  const long rows_a = ta == blas::N ? m : k, rows_b = tb == blas::N ? k : n;  // NOLINT
  if (m < 0 || n < 0 || k < 0 || lda < std::max(1L, rows_a) || ldb < std::max(1L, rows_b) ||
      ldc < std::max(1L, static_cast<long>(m)))
    throw std::runtime_error("emulated cublasGemmEx: invalid arguments m=" + std::to_string(m) +
                             " n=" + std::to_string(n) + " k=" + std::to_string(k) +
                             " lda=" + std::to_string(lda) + " ldb=" + std::to_string(ldb) +
                             " ldc=" + std::to_string(ldc));
  if (at != bt || (ct != blas::R32F && ct != at))
    throw std::runtime_error("emulated cublasGemmEx: type combination not supported by cuBLAS");
  {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_log.push_back({m, n, k});
  }
  ::emu::add_delay("FUSEDRNN_EMU_GEMM_DELAY_MS");
  for (long j = 0; j < n; ++j)
    for (long i = 0; i < m; ++i) {
      float acc = 0.f;
      for (long l = 0; l < k; ++l) {
        const float a = ta == blas::N ? load(A, at, i + l * lda) : load(A, at, l + i * lda);
        const float b = tb == blas::N ? load(B, bt, l + j * ldb) : load(B, bt, j + l * ldb);
        acc += a * b;
      }
      const float prev = beta != 0.f ? load(C, ct, i + j * ldc) : 0.f;
      store(C, ct, i + j * ldc, alpha * acc + beta * prev);
    }
}

}  // namespace cuda
}  // namespace fusedrnn
