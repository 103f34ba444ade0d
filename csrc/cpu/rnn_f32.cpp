// fusedrnn: float32 instantiation of the CPU drivers.
#include "rnn_impl.h"

namespace fusedrnn {
template std::unique_ptr<Cache<float>> forward<float>(const ForwardParams<float>&);
template void backward<float>(const Cache<float>&, const BackwardParams<float>&);
}  // namespace fusedrnn
