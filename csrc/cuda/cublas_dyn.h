// fusedrnn: the few cuBLAS entry points the CUDA kernels call, resolved at run
// time (dlopen) instead of at link time.
//
// Why: the CUDA extension then builds with nothing but nvcc and the CUDA
// runtime (no cuBLAS headers or libraries at build time), and imports on any
// machine; cuBLAS is looked for only when a device call first needs it, in
// the nvidia-cublas wheel (the one PyTorch's CUDA builds install) or on the
// system library path. The declarations below restate cuBLAS's documented C
// ABI (cublas_api.h, v2 API, CUDA 12 and 13): handle, operation, data and
// compute types as ints. tests/test_cuda.py compares these values with the
// real header when one is installed.
#pragma once

#include "runtime.h"

#include <cstdint>
#include <array>
#include <string>
#include <vector>

namespace fusedrnn {
namespace cuda {

namespace blas {
using Handle = struct cublasContext*;
using Status = int;  // cublasStatus_t: 0 is success
enum Op : int { N = 0, T = 1 };                              // cublasOperation_t
enum Type : int { R32F = 0, R16F = 2, R16BF = 14 };          // cudaDataType_t
constexpr int kCompute32F = 68;                              // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;                             // CUBLAS_GEMM_DEFAULT
constexpr int kDefaultMath = 0;                              // CUBLAS_DEFAULT_MATH
constexpr int kNoReducedPrecisionReduction = 16;  // CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION
}  // namespace blas

// Loads cuBLAS once per process (thread-safe). `dir` is a folder tried first
// (the Python layer passes the nvidia-cublas wheel's lib folder when that
// wheel is installed); then the system's search path. Throws
// std::runtime_error naming what was tried when no library loads.
void load_cublas(const std::string& dir);
bool cublas_loaded();
std::string cublas_path();

// A cuBLAS handle per (thread, device), created on first use.
blas::Handle cublas_handle(int device);

// Column-major C = alpha op(A) op(B) + beta C with float alpha/beta and
// float32 accumulation (CUBLAS_COMPUTE_32F in the default math mode, which
// uses no TF32, with reduced-precision reductions disallowed, so 16-bit
// outputs are rounded once from float32 sums). Sizes beyond cuBLAS's int
// range throw; so does any failure.
void gemm(cudaStream_t stream, int device, blas::Op ta, blas::Op tb, int64_t m, int64_t n, int64_t k,
          float alpha, const void* A, blas::Type at, long lda, const void* B, blas::Type bt,
          long ldb, float beta, void* C, blas::Type ct, long ldc);

#ifdef FUSEDRNN_CUDA_EMULATE
// The emulator only: (m, n, k) of every GEMM with work to do since the last
// call, in call order, and the log cleared (tests check which products ran).
std::vector<std::array<int64_t, 3>> take_gemm_log();
#endif

}  // namespace cuda
}  // namespace fusedrnn
