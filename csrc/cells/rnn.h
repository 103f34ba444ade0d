// fusedrnn: Elman RNN cell, pointwise math for one element of the hidden state
// (or one SIMD vector of elements: see the math policy in activations.h).
//
//   h' = act(a),  a = W_ih x + b_ih + W_hh h + b_hh   (act: tanh, relu or sigmoid)
//
// Saved for backward: h' (the activation's output is enough for its derivative).
#pragma once

#include "activations.h"

namespace fusedrnn {
namespace cell {

template <Cell C, class M>
struct Rnn {
  using T = typename M::T;
  using S = typename M::S;

  static FUSEDRNN_HD T forward(T a) {
    if constexpr (C == Cell::RnnTanh) return M::tanh(a);
    else if constexpr (C == Cell::RnnRelu) return M::relu(a);
    else return M::sigmoid(a);
  }

  // dh: gradient w.r.t. h'; returns the gradient w.r.t. the pre-activation a.
  static FUSEDRNN_HD T backward(T dh, T h_new) {
    if constexpr (C == Cell::RnnTanh) return dh * (S(1) - h_new * h_new);
    else if constexpr (C == Cell::RnnRelu) return dh * M::relu_grad(h_new);
    else return dh * (h_new * (S(1) - h_new));
  }
};

}  // namespace cell
}  // namespace fusedrnn
