// fusedrnn: shared definitions for every kernel.
//
// Shape legend (DESIGN.md section 2), rightmost dimension fastest:
//   T = time steps, B = batch, I = input size, H = hidden size,
//   G = gates per cell (rnn 1, gru 3, lstm 4), N = rows actually computed
//   (T*B, or the sum of the lengths when lengths are given).
// Nothing in this directory knows about Python, pybind11 or NumPy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <stdexcept>

#if defined(__CUDACC__)
#define FUSEDRNN_HD __host__ __device__ __forceinline__
#else
#define FUSEDRNN_HD inline
#endif

namespace fusedrnn {

// Proj is internal: the linear map h' = W_hr m of an LSTM with projection,
// run by the kernels as a cell of one gate with no bias or nonlinearity.
enum class Cell : int { RnnTanh = 0, RnnRelu = 1, RnnSigmoid = 2, Lstm = 3, Gru = 4, Proj = 5 };

inline int gates_of(Cell cell) {
  switch (cell) {
    case Cell::Lstm: return 4;
    case Cell::Gru: return 3;
    default: return 1;
  }
}

// Overflow-checked size arithmetic: a product that cannot be represented can
// never be allocated, so it is reported as an allocation failure.
inline std::size_t checked_mul(std::size_t a, std::size_t b) {
  std::size_t r;
  if (__builtin_mul_overflow(a, b, &r)) throw std::bad_alloc();
  return r;
}

}  // namespace fusedrnn
