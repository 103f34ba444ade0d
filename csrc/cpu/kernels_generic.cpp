// fusedrnn: the per-step kernels built for one instruction set (generic,
// 16-byte vectors). CMake gives this file its -m flags; kernels.cpp calls
// it only on a CPU that has them.
#define FUSEDRNN_ISA_NS generic
#define FUSEDRNN_ISA_NAME "generic"
#define FUSEDRNN_VBYTES 16
#include "kernels_impl.h"

namespace fusedrnn {
template <>
const Kernels<float>* kernels_generic<float>() {
  return generic::table<float>();
}
template <>
const Kernels<double>* kernels_generic<double>() {
  return generic::table<double>();
}
}  // namespace fusedrnn
