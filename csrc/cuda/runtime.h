// fusedrnn: the CUDA runtime as the backend sees it: the real one (nvcc
// builds), or the host emulator (emulate.h) when FUSEDRNN_CUDA_EMULATE is
// defined. The emulator runs the same kernels and drivers on the CPU, so the
// backend's logic is tested on machines without a GPU (tests/test_cuda_emulated.py).
//
//   FUSEDRNN_LAUNCH(grid, block, smem, stream, kernel)(args...)   a kernel launch
//   FUSEDRNN_SHARED_BYTES(name)          the dynamic shared memory, as unsigned char*
//   launch_cooperative(kernel, blocks, threads, smem, stream, arg)
//                                        a cooperative launch of a one-argument kernel
//   launch_cluster(kernel, blocks, threads, smem, stream, arg)
//                                        one thread-block cluster of `blocks` blocks
//   max_active_clusters(kernel, blocks, threads, smem)   how many such clusters fit
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

// One thread-block cluster of `blocks` blocks (sm_90 and later): its blocks
// are resident together and share their shared memory.
inline cudaLaunchConfig_t cluster_config(int blocks, int threads, std::size_t smem, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = blocks;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

template <typename Arg>
void launch_cluster(void (*kernel)(Arg), int blocks, int threads, std::size_t smem,
                    cudaStream_t stream, Arg& arg) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(blocks, threads, smem, stream, &attr);
  check(cudaLaunchKernelEx(&cfg, kernel, arg), "cudaLaunchKernelEx (cluster)");
}

// How many clusters of `blocks` blocks can be resident at once (0: none).
template <typename Arg>
int max_active_clusters(void (*kernel)(Arg), int blocks, int threads, std::size_t smem) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(blocks, threads, smem, nullptr, &attr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, reinterpret_cast<const void*>(kernel), &cfg) !=
      cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}
}  // namespace cuda
}  // namespace fusedrnn
#endif
#endif
