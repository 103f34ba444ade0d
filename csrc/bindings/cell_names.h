// fusedrnn: cell names at the Python boundary, shared by both extension
// modules (fusedrnn._core and fusedrnn._cuda).
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "fusedrnn/common.h"

namespace fusedrnn {

inline const char* cell_name(Cell c) {
  switch (c) {
    case Cell::RnnTanh: return "rnn_tanh";
    case Cell::RnnRelu: return "rnn_relu";
    case Cell::RnnSigmoid: return "rnn_sigmoid";
    case Cell::Lstm: return "lstm";
    case Cell::Gru: return "gru";
    default: return "?";  // Proj is internal: never named from Python
  }
}

inline Cell parse_cell(const std::string& s) {
  for (Cell c : {Cell::RnnTanh, Cell::RnnRelu, Cell::RnnSigmoid, Cell::Lstm, Cell::Gru})
    if (s == cell_name(c)) return c;
  throw pybind11::value_error("cell must be one of 'gru', 'lstm', 'rnn_relu', 'rnn_sigmoid', "
                              "'rnn_tanh', got '" + s + "'");
}

}  // namespace fusedrnn
