// fusedrnn: float64 instantiation of the CPU drivers.
#include "rnn_impl.h"

namespace fusedrnn {
template std::unique_ptr<Cache<double>> forward<double>(const ForwardParams<double>&);
template void backward<double>(const Cache<double>&, const BackwardParams<double>&);
}  // namespace fusedrnn
