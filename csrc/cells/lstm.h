// fusedrnn: LSTM cell (gate order i, f, g, o), pointwise math for one element
// (or one SIMD vector of elements: see the math policy in activations.h).
//
//   i = sigmoid(a_i)  f = sigmoid(a_f)  g = tanh(a_g)  o = sigmoid(a_o)
//   c' = f*c + i*g    h' = o*tanh(c')
//
// Saved for backward: the activated gates i, f, g, o, the previous cell c and
// the new cell c'.
#pragma once

#include "activations.h"

namespace fusedrnn {
namespace cell {

template <class M>
struct Lstm {
  using T = typename M::T;
  using S = typename M::S;
  struct Gates {
    T i, f, g, o;
  };

  static FUSEDRNN_HD Gates gates(T ai, T af, T ag, T ao) {
    return {M::sigmoid(ai), M::sigmoid(af), M::tanh(ag), M::sigmoid(ao)};
  }

  // Returns c'; writes h'.
  static FUSEDRNN_HD T forward(const Gates& q, T c, T* h_new) {
    const T c_new = q.f * c + q.i * q.g;
    *h_new = q.o * M::tanh(c_new);
    return c_new;
  }

  // dh, dc: gradients w.r.t. h' and c'. Writes the pre-activation gradients
  // d = (da_i, da_f, da_g, da_o) and returns the gradient w.r.t. c.
  static FUSEDRNN_HD T backward(const Gates& q, T c, T c_new, T dh, T dc, Gates* d) {
    const T tc = M::tanh(c_new);
    const T dct = dc + dh * q.o * (S(1) - tc * tc);
    d->i = dct * q.g * (q.i * (S(1) - q.i));
    d->f = dct * c * (q.f * (S(1) - q.f));
    d->g = dct * q.i * (S(1) - q.g * q.g);
    d->o = dh * tc * (q.o * (S(1) - q.o));
    return dct * q.f;
  }
};

}  // namespace cell
}  // namespace fusedrnn
