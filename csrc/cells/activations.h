// fusedrnn: scalar nonlinearities and their derivatives, host and device.
// Saturating forms: sigmoid(+-1e4) is exactly 1 or 0, never NaN.
#pragma once

#include <cmath>

#include "fusedrnn/common.h"

namespace fusedrnn {

template <typename T>
FUSEDRNN_HD T sigmoid(T x) {
  // exp of a negative argument never overflows; the two branches agree at 0.
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

template <typename T>
FUSEDRNN_HD T tanh_(T x) {
  return std::tanh(x);
}

template <typename T>
FUSEDRNN_HD T relu(T x) {
  return x > T(0) ? x : T(0);
}

// Derivatives expressed through the activation's output y.
template <typename T>
FUSEDRNN_HD T dsigmoid_from_y(T y) {
  return y * (T(1) - y);
}
template <typename T>
FUSEDRNN_HD T dtanh_from_y(T y) {
  return T(1) - y * y;
}
template <typename T>
FUSEDRNN_HD T drelu_from_y(T y) {
  return y > T(0) ? T(1) : T(0);
}

}  // namespace fusedrnn
