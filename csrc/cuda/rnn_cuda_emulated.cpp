// fusedrnn: the CUDA backend's kernels and drivers compiled for the host
// emulator (emulate.h), as the test-only module fusedrnn._cuda_emu.
#ifndef FUSEDRNN_CUDA_EMULATE
#error "build this file with FUSEDRNN_CUDA_EMULATE defined"
#endif
#include "rnn_cuda.cu"
