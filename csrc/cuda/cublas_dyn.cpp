// fusedrnn: run-time loading of cuBLAS (see cublas_dyn.h).
#include "cublas_dyn.h"

#ifdef FUSEDRNN_CUDA_EMULATE
#include "emulated_blas.h"
#else
#include <dlfcn.h>

#include <atomic>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>
#include <utility>

namespace fusedrnn {
namespace cuda {

namespace {

using CreateFn = blas::Status (*)(blas::Handle*);
using SetStreamFn = blas::Status (*)(blas::Handle, cudaStream_t);
using SetMathFn = blas::Status (*)(blas::Handle, int);
using GemmExFn = blas::Status (*)(blas::Handle, int, int, int, int, int, const void*, const void*,
                                  int, int, const void*, int, int, const void*, void*, int, int,
                                  int, int);

struct Api {
  void* lib = nullptr;
  std::string path;
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  SetMathFn set_math = nullptr;
  GemmExFn gemm_ex = nullptr;
};

Api g_api;
std::mutex g_mutex;
std::atomic<bool> g_ready{false};  // set (release) once g_api is complete

void* sym(void* lib, const char* name, const std::string& path) {
  void* p = dlsym(lib, name);
  if (!p) throw std::runtime_error("cuBLAS at " + path + " lacks " + name);
  return p;
}

}  // namespace

void load_cublas(const std::string& dir) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_api.lib) return;
  std::vector<std::string> tried;
  const char* names[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so"};
  void* lib = nullptr;
  std::string path;
  for (int pass = 0; pass < 2 && !lib; ++pass) {
    if (pass == 0 && dir.empty()) continue;
    for (const char* n : names) {
      path = pass == 0 ? dir + "/" + n : std::string(n);
      lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (lib) break;
      tried.push_back(path);
    }
  }
  if (!lib) {
    std::string msg = "the CUDA backend needs cuBLAS, and none could be loaded (tried";
    for (const auto& t : tried) msg += " " + t;
    msg += "); install it with: pip install nvidia-cublas";
    throw std::runtime_error(msg);
  }
  Api api;
  api.lib = lib;
  api.path = path;
  api.create = reinterpret_cast<CreateFn>(sym(lib, "cublasCreate_v2", path));
  api.set_stream = reinterpret_cast<SetStreamFn>(sym(lib, "cublasSetStream_v2", path));
  api.set_math = reinterpret_cast<SetMathFn>(sym(lib, "cublasSetMathMode", path));
  api.gemm_ex = reinterpret_cast<GemmExFn>(sym(lib, "cublasGemmEx", path));
  g_api = api;
  g_ready.store(true, std::memory_order_release);
}

bool cublas_loaded() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_api.lib != nullptr;
}

std::string cublas_path() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_api.path;
}

blas::Handle cublas_handle(int device) {
  // Handles are never destroyed: cuBLAS's own advice is one per thread and
  // device for the life of the process, and destroying them at exit races
  // with the driver's teardown.
  thread_local std::map<int, blas::Handle> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  if (!g_ready.load(std::memory_order_acquire)) load_cublas("");
  blas::Handle h = nullptr;
  blas::Status s = g_api.create(&h);
  if (s != 0) throw std::runtime_error("cublasCreate failed with status " + std::to_string(s));
  s = g_api.set_math(h, blas::kDefaultMath | blas::kNoReducedPrecisionReduction);
  if (s != 0) throw std::runtime_error("cublasSetMathMode failed with status " + std::to_string(s));
  handles.emplace(device, h);
  return h;
}

void gemm(cudaStream_t stream, int device, blas::Op ta, blas::Op tb, int64_t m, int64_t n,
          int64_t k, float alpha, const void* A, blas::Type at, long lda, const void* B,
          blas::Type bt, long ldb, float beta, void* C, blas::Type ct, long ldc) {
  if (m == 0 || n == 0) return;
  constexpr int64_t kMax = 0x7fffffff;
  if (m > kMax || n > kMax || k > kMax || lda > kMax || ldb > kMax || ldc > kMax)
    throw std::runtime_error("a matrix dimension exceeds cuBLAS's int range (2^31 - 1)");
  blas::Handle h = cublas_handle(device);
  blas::Status s = g_api.set_stream(h, stream);
  if (s != 0) throw std::runtime_error("cublasSetStream failed with status " + std::to_string(s));
  s = g_api.gemm_ex(h, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, A, at, static_cast<int>(lda), B, bt,
                    static_cast<int>(ldb), &beta, C, ct, static_cast<int>(ldc), blas::kCompute32F,
                    blas::kGemmDefault);
  if (s != 0) throw std::runtime_error("cublasGemmEx failed with status " + std::to_string(s));
}

}  // namespace cuda
}  // namespace fusedrnn
#endif  // FUSEDRNN_CUDA_EMULATE
