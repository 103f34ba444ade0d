// fusedrnn: GRU cell (gate order r, z, n; reset applied after the recurrent
// product, as PyTorch and cuDNN), pointwise math for one element.
//
//   r = sigmoid(xr + hr)   z = sigmoid(xz + hz)   with x* = W_i* x + b_i*,
//   n = tanh(xn + r*hn)                                 h* = W_h* h + b_h*
//   h' = (1 - z)*n + z*h
//
// Saved for backward: r, z, n, hn and the previous state h.
#pragma once

#include "activations.h"

namespace fusedrnn {
namespace cell {

template <typename T>
struct GruGates {
  T r, z, n;
};

template <typename T>
FUSEDRNN_HD GruGates<T> gru_gates(T xr, T xz, T xn, T hr, T hz, T hn) {
  const T r = sigmoid(xr + hr);
  return {r, sigmoid(xz + hz), tanh_(xn + r * hn)};
}

template <typename T>
FUSEDRNN_HD T gru_forward(const GruGates<T>& q, T h) {
  return (T(1) - q.z) * q.n + q.z * h;
}

// dh: gradient w.r.t. h'. Writes dx = gradient w.r.t. (xr, xz, xn) and
// dhh = gradient w.r.t. (hr, hz, hn); returns the direct part of the gradient
// w.r.t. h (the part through W_hh is added by the recurrent product).
template <typename T>
FUSEDRNN_HD T gru_backward(const GruGates<T>& q, T hn, T h, T dh, GruGates<T>* dx,
                           GruGates<T>* dhh) {
  const T dn = dh * (T(1) - q.z) * dtanh_from_y(q.n);
  const T dz = dh * (h - q.n) * dsigmoid_from_y(q.z);
  const T dr = dn * hn * dsigmoid_from_y(q.r);
  *dx = {dr, dz, dn};
  *dhh = {dr, dz, dn * q.r};
  return dh * q.z;
}

}  // namespace cell
}  // namespace fusedrnn
