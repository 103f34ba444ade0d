// fusedrnn: the CUDA runtime as the backend sees it: the real one (nvcc
// builds), or the host emulator (emulate.h) when FUSEDRNN_CUDA_EMULATE is
// defined. The emulator runs the same kernels and drivers on the CPU, so the
// backend's logic is tested on machines without a GPU (tests/test_cuda_emulated.py).
//
//   FUSEDRNN_LAUNCH(grid, block, smem, stream, kernel)(args...)   a kernel launch
//   FUSEDRNN_SHARED_BYTES(name)          the dynamic shared memory, as unsigned char*
//   launch_cooperative(kernel, blocks, threads, smem, stream, arg)
//                                        a cooperative launch of a one-argument kernel
#pragma once

#ifdef FUSEDRNN_CUDA_EMULATE
#include "emulate.h"
#else
#include <cuda_runtime_api.h>
#if defined(__CUDACC__)
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define FUSEDRNN_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define FUSEDRNN_SHARED_BYTES(name) extern __shared__ __align__(16) unsigned char name[]

namespace fusedrnn {
namespace cuda {
void check(cudaError_t e, const char* what);

template <typename Arg>
void launch_cooperative(void (*kernel)(Arg), int blocks, int threads, std::size_t smem,
                        cudaStream_t stream, Arg& arg) {
  void* args[] = {&arg};
  check(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), blocks, threads, args, smem,
                                    stream),
        "cudaLaunchCooperativeKernel");
}
}  // namespace cuda
}  // namespace fusedrnn
#endif
#endif
