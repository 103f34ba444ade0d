// fusedrnn: row-major GEMM on OpenBLAS (scipy-openblas32 wheel, prefixed symbols).
//
//   C[M, N] = alpha * op(A) op(B) + beta * C,   op(A) is [M, K], op(B) is [K, N].
//
// The wheel's BLAS takes 32-bit sizes; gemm() splits M and K into pieces that
// fit, so callers can pass any int64 sizes. Zero-sized products are handled
// here (C = beta * C) rather than passed to BLAS.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cblas.h>

namespace fusedrnn {

namespace detail {
inline void gemm_call(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void gemm_call(bool ta, bool tb, int m, int n, int k, double alpha, const double* a,
                      int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  scipy_cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
constexpr int64_t kBlasMax = int64_t(1) << 30;
}  // namespace detail

// Layers whose products have at most this many multiply-adds in all run them
// as plain loops (gemm's `loop`): a BLAS call (argument checks, packing) costs
// more. The caller decides once per layer from its whole size, so that every
// product of one layer takes the same path whatever its cut into tasks or
// segments.
constexpr int64_t kTinyGemm = 4096;

// ta: A is stored [K, M] (transposed); tb: B is stored [N, K].
template <typename T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc, bool loop = false) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // C = beta * C
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  if (loop) {
    for (int64_t i = 0; i < M; ++i) {
      T* c = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) c[j] = beta == T(0) ? T(0) : beta * c[j];
      for (int64_t k = 0; k < K; ++k) {
        const T a = alpha * (ta ? A[k * lda + i] : A[i * lda + k]);
        if (tb)
          for (int64_t j = 0; j < N; ++j) c[j] += a * B[j * ldb + k];
        else
          for (int64_t j = 0; j < N; ++j) c[j] += a * B[k * ldb + j];
      }
    }
    return;
  }
  using detail::kBlasMax;
  for (int64_t m0 = 0; m0 < M; m0 += kBlasMax) {
    const int64_t m = std::min(kBlasMax, M - m0);
    const T* Am = ta ? A + m0 : A + m0 * lda;
    T* Cm = C + m0 * ldc;
    for (int64_t k0 = 0; k0 < K; k0 += kBlasMax) {
      const int64_t k = std::min(kBlasMax, K - k0);
      const T* Ak = ta ? Am + k0 * lda : Am + k0;
      const T* Bk = tb ? B + k0 : B + k0 * ldb;
      detail::gemm_call(ta, tb, int(m), int(N), int(k), alpha, Ak, int(lda), Bk, int(ldb),
                        k0 == 0 ? beta : T(1), Cm, int(ldc));
    }
  }
}

}  // namespace fusedrnn
