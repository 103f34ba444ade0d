// fusedrnn: LSTM cell (gate order i, f, g, o), pointwise math for one element.
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

template <typename T>
struct LstmGates {
  T i, f, g, o;
};

template <typename T>
FUSEDRNN_HD LstmGates<T> lstm_gates(T ai, T af, T ag, T ao) {
  return {sigmoid(ai), sigmoid(af), tanh_(ag), sigmoid(ao)};
}

// Returns c'; writes h'.
template <typename T>
FUSEDRNN_HD T lstm_forward(const LstmGates<T>& q, T c, T* h_new) {
  const T c_new = q.f * c + q.i * q.g;
  *h_new = q.o * tanh_(c_new);
  return c_new;
}

// dh, dc: gradients w.r.t. h' and c'. Writes the pre-activation gradients
// d = (da_i, da_f, da_g, da_o) and returns the gradient w.r.t. c.
template <typename T>
FUSEDRNN_HD T lstm_backward(const LstmGates<T>& q, T c, T c_new, T dh, T dc, LstmGates<T>* d) {
  const T tc = tanh_(c_new);
  const T dct = dc + dh * q.o * dtanh_from_y(tc);
  d->i = dct * q.g * dsigmoid_from_y(q.i);
  d->f = dct * c * dsigmoid_from_y(q.f);
  d->g = dct * q.i * dtanh_from_y(q.g);
  d->o = dh * tc * dsigmoid_from_y(q.o);
  return dct * q.f;
}

}  // namespace cell
}  // namespace fusedrnn
