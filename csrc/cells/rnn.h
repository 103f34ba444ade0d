// fusedrnn: Elman RNN cell, pointwise math for one element of the hidden state.
//
//   h' = act(a),  a = W_ih x + b_ih + W_hh h + b_hh   (act: tanh, relu or sigmoid)
//
// Saved for backward: h' (the activation's output is enough for its derivative).
#pragma once

#include "activations.h"

namespace fusedrnn {
namespace cell {

template <Cell C, typename T>
FUSEDRNN_HD T rnn_act(T a) {
  if constexpr (C == Cell::RnnTanh) return tanh_(a);
  else if constexpr (C == Cell::RnnRelu) return relu(a);
  else return sigmoid(a);
}

// dh: gradient w.r.t. h'; returns the gradient w.r.t. the pre-activation a.
template <Cell C, typename T>
FUSEDRNN_HD T rnn_backward(T dh, T h_new) {
  if constexpr (C == Cell::RnnTanh) return dh * dtanh_from_y(h_new);
  else if constexpr (C == Cell::RnnRelu) return dh * drelu_from_y(h_new);
  else return dh * dsigmoid_from_y(h_new);
}

}  // namespace cell
}  // namespace fusedrnn
