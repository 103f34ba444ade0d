// fusedrnn: GRU cell (gate order r, z, n; reset applied after the recurrent
// product, as PyTorch and cuDNN), pointwise math for one element (or one SIMD
// vector of elements: see the math policy in activations.h).
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

template <class M>
struct Gru {
  using T = typename M::T;
  using S = typename M::S;
  struct Gates {
    T r, z, n;
  };

  static FUSEDRNN_HD Gates gates(T xr, T xz, T xn, T hr, T hz, T hn) {
    const T r = M::sigmoid(xr + hr);
    return {r, M::sigmoid(xz + hz), M::tanh(xn + r * hn)};
  }

  static FUSEDRNN_HD T forward(const Gates& q, T h) { return (S(1) - q.z) * q.n + q.z * h; }

  // dh: gradient w.r.t. h'. Writes dx = gradient w.r.t. (xr, xz, xn) and
  // dhh = gradient w.r.t. (hr, hz, hn); returns the direct part of the
  // gradient w.r.t. h (the part through W_hh is added by the recurrent product).
  static FUSEDRNN_HD T backward(const Gates& q, T hn, T h, T dh, Gates* dx, Gates* dhh) {
    const T dn = dh * (S(1) - q.z) * (S(1) - q.n * q.n);
    const T dz = dh * (h - q.n) * (q.z * (S(1) - q.z));
    const T dr = dn * hn * (q.r * (S(1) - q.r));
    *dx = {dr, dz, dn};
    *dhh = {dr, dz, dn * q.r};
    return dh * q.z;
  }
};

}  // namespace cell
}  // namespace fusedrnn
