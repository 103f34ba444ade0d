// fusedrnn: choose the per-step kernels for this CPU, once.
#include "kernels.h"

#include <cstdlib>
#include <cstring>

namespace fusedrnn {

namespace {

enum class Isa { Generic, Avx2, Avx512 };

bool cpu_has_avx2() {
#if defined(FUSEDRNN_HAVE_AVX2)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(FUSEDRNN_HAVE_AVX512)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// The best instruction set this CPU runs, capped by FUSEDRNN_ISA if set.
Isa choose() {
  Isa best = cpu_has_avx512() ? Isa::Avx512 : cpu_has_avx2() ? Isa::Avx2 : Isa::Generic;
  if (const char* env = std::getenv("FUSEDRNN_ISA")) {
    Isa want = best;
    if (!std::strcmp(env, "generic")) want = Isa::Generic;
    else if (!std::strcmp(env, "avx2")) want = Isa::Avx2;
    else if (!std::strcmp(env, "avx512")) want = Isa::Avx512;
    if (int(want) < int(best)) best = want;
  }
  return best;
}

const Isa g_isa = choose();

template <typename S>
const Kernels<S>* select() {
#if defined(FUSEDRNN_HAVE_AVX512)
  if (g_isa == Isa::Avx512) return kernels_avx512<S>();
#endif
#if defined(FUSEDRNN_HAVE_AVX2)
  if (g_isa == Isa::Avx2) return kernels_avx2<S>();
#endif
  return kernels_generic<S>();
}

}  // namespace

template <typename S>
const Kernels<S>& kernels() {
  static const Kernels<S>* k = select<S>();
  return *k;
}
template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();

const char* isa_name() { return kernels<float>().isa; }

}  // namespace fusedrnn
