// fusedrnn: the per-step kernels built for one instruction set (avx512,
// 64-byte vectors). CMake gives this file its -m flags; kernels.cpp calls
// it only on a CPU that has them.
#define FUSEDRNN_ISA_NS avx512
#define FUSEDRNN_ISA_NAME "avx512"
#define FUSEDRNN_VBYTES 64
#include "kernels_impl.h"

namespace fusedrnn {
template <>
const Kernels<float>* kernels_avx512<float>() {
  return avx512::table<float>();
}
template <>
const Kernels<double>* kernels_avx512<double>() {
  return avx512::table<double>();
}
}  // namespace fusedrnn
