// fusedrnn: scalar nonlinearities, the math policy of the cell headers.
//
// Every cell header is written once against a *math policy* M that provides
//   M::T                      the value type (a scalar, or a SIMD vector)
//   M::S                      its scalar type (float, double)
//   M::sigmoid/tanh/relu(T)   the activations
//   M::relu_grad(T y)         1 where y > 0, else 0
// so the same equations serve scalar code, SIMD epilogues (csrc/cpu/simd.h)
// and CUDA. ScalarMath below is the plain one. Saturating forms: sigmoid and
// tanh of +-1e4 are exactly +-1 or 0, never NaN.
#pragma once

#include <cmath>

#include "fusedrnn/common.h"

namespace fusedrnn {

template <typename Scalar>
struct ScalarMath {
  using T = Scalar;
  using S = Scalar;
  static FUSEDRNN_HD T sigmoid(T x) {
    // exp of a non-positive argument never overflows; both branches agree at 0.
    if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
    const T e = std::exp(x);
    return e / (T(1) + e);
  }
  static FUSEDRNN_HD T tanh(T x) { return std::tanh(x); }
  static FUSEDRNN_HD T relu(T x) { return x < T(0) ? T(0) : x; }  // NaN stays NaN
  static FUSEDRNN_HD T relu_grad(T y) { return y > T(0) ? T(1) : T(0); }
};

}  // namespace fusedrnn
