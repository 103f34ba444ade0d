// fusedrnn: the per-step kernels built for one instruction set (avx2,
// 32-byte vectors). CMake gives this file its -m flags; kernels.cpp calls
// it only on a CPU that has them.
#define FUSEDRNN_ISA_NS avx2
#define FUSEDRNN_ISA_NAME "avx2"
#define FUSEDRNN_VBYTES 32
#include "kernels_impl.h"

namespace fusedrnn {
template <>
const Kernels<float>* kernels_avx2<float>() {
  return avx2::table<float>();
}
template <>
const Kernels<double>* kernels_avx2<double>() {
  return avx2::table<double>();
}
}  // namespace fusedrnn
