// fusedrnn: the CUDA backend's entry points (no pybind11 here; the bindings
// in csrc/bindings/cuda_module.cpp check arguments and call these).
//
// Shape legend as everywhere (common.h): T steps, B batch, I input size,
// H hidden size, G gates, N = T*B rows, P the state's size: the projection
// size of an LSTM with w_hr [P, H] (h = W_hr (o * tanh(c))), else H. All
// pointers are device pointers to C-contiguous arrays of the call's dtype on
// one device, except lengths and mask, which are host arrays (the Python layer brings them to the host:
// their values decide which rows each step's product covers).
//
// Per-(t, b) buffers are kept in x's row order, r(t, b) = t*B + b, or b*T + t
// with batch_first, so that every "all steps at once" product (input
// projection, dx, dW_ih, dW_hh) is one GEMM over N rows whatever the layout,
// and a step's rows are a strided matrix with leading dimension
// bstride * width (bstride = T with batch_first, else 1).
#pragma once

#include "runtime.h"

#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "fusedrnn/common.h"

namespace fusedrnn {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
// Benchmark: time the algorithms that can run a problem on its first call and
// keep the fastest for the problem's key (see benchmark_table below).
enum class Algo : int { Auto = 0, Standard = 1, Persistent = 2, Benchmark = 3 };

inline std::size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

struct Problem {
  Cell cell = Cell::Lstm;
  DType dtype = DType::F32;
  int64_t T = 0, B = 0, I = 0, H = 0;
  int64_t P = 0;      // state size: H without projection
  bool proj = false;  // lstm with projection (w_hr)
  bool reverse = false, batch_first = false;
  int device = 0;
  cudaStream_t stream = nullptr;
  // The persistent kernels' cluster mode: 1 asked for, 0 not, -1 as
  // FUSEDRNN_CUDA_PERSISTENT_CLUSTER says (benchmark mode sets it per candidate).
  int cluster = -1;
  int G() const { return gates_of(cell); }
  int64_t N() const { return T * B; }
  // (host and device: the persistent kernels place their steps with these)
  FUSEDRNN_HD int64_t bstride() const { return batch_first ? T : 1; }
  FUSEDRNN_HD int64_t row0(int64_t t) const { return batch_first ? t : t * B; }
  // the time index of the s-th step processed
  FUSEDRNN_HD int64_t t_of(int64_t s) const { return reverse ? T - 1 - s : s; }
};

struct ForwardIn {
  const void *x = nullptr, *w_ih = nullptr, *w_hh = nullptr;
  const void *b_ih = nullptr, *b_hh = nullptr, *h0 = nullptr, *c0 = nullptr;  // null: zeros
  const void* w_hr = nullptr;  // [P, H] with projection, else null
  std::vector<int32_t> lengths;  // host, [B], empty: no lengths
  std::vector<uint8_t> mask;     // host, time-major [T, B], empty: no mask
  int64_t checkpoint = 0;        // training: keep the state every k steps only (0: every step)
};

// What backward needs, in one device allocation owned by this object:
// copies of x, w_ih and w_hh (and w_hr), the state entering every step, the
// LSTM cell after every step, the saved gates, with projection the cell's
// output o * tanh(c) of every valid step, c0 in float32, lengths and mask.
// Checkpointed (ck = k > 0): instead of every step's values, the biases and
// the state (h, and c in float32) entering steps 0, k, 2k, ... (processing
// order), from which backward recomputes each segment of k steps.
class Cache {
 public:
  Cache(const Problem& p, const ForwardIn& in);
  ~Cache();
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  Problem p;
  std::vector<int32_t> lengths;
  std::vector<uint8_t> mask;
  Algo algo = Algo::Standard;  // the algorithm forward ran
  int fwd_cluster = -1;        // persistent: whether forward ran in cluster mode (1) or not (0)
  bool benchmark = false;      // forward ran in benchmark mode: so does backward
  // The stream of the last call that used the memory (forward's, then each
  // backward's): the memory is freed in that stream's order.
  mutable cudaStream_t last_stream = nullptr;
  // Orders a use on stream st after all earlier uses (thread-safe).
  void use_on(cudaStream_t st) const;
  std::size_t nbytes = 0;
  char* mem = nullptr;
  int64_t ck = 0;  // checkpoint interval k, 0: every step kept
  bool has_b_ih = false, has_b_hh = false;
  // The rows of x kept for dW_ih: all T*B in x's row order, or, when some
  // step is not valid (lengths, mask), only the valid ones, packed (see
  // RunningRows in rnn_cuda.cu).
  int64_t x_rows = 0;
  // byte offsets into mem
  std::size_t x_off = 0, wih_off = 0, whh_off = 0, whr_off = 0, hprev_off = 0, cs_off = 0,
              gates_off = 0, m_off = 0, c0_off = 0, len_off = 0, mask_off = 0, bih_off = 0,
              bhh_off = 0, ckh_off = 0, ckc_off = 0;
  template <typename T>
  T* at(std::size_t off) const { return reinterpret_cast<T*>(mem + off); }

 private:
  mutable std::mutex mutex_;
};

// Saved gate values per row: lstm i, f, g, o; gru r, z, n and W_hn h + b_hn;
// rnn the new state h' (its activation's derivative needs only that).
inline int saved_width(Cell c) { return c == Cell::Lstm || c == Cell::Gru ? 4 : 1; }

// How many steps (t, b) are valid (DESIGN.md §2): T*B without lengths or mask.
int64_t valid_steps(const Problem& p, const std::vector<int32_t>& lengths,
                    const std::vector<uint8_t>& mask);

// The algorithm Algo::Auto picks for a problem (see docs/cuda.md).
Algo choose_algo(const Problem& p);
// Whether the persistent kernel can run this problem on this device (its
// slice of W_hh must fit one block's shared memory, its grid co-resident).
bool persistent_fits(const Problem& p);

// A persistent kernel's layout on this device: U hidden units per block and
// blocks; in shared memory, the block's slice of W_hh as rows of ld values
// (padded with zeros to 16 bytes), bc staged vectors (the state forward, the
// gate gradients backward) and their products in ks parts of k (float32).
// cluster > 0: the blocks form one thread-block cluster of that size, which
// keeps the whole batch's vectors in two buffers (bc = B) and exchanges them
// through distributed shared memory (sm_90; FUSEDRNN_CUDA_PERSISTENT_CLUSTER=1;
// 8 blocks, or 16 where 8 cannot hold W_hh).
// LSTM projection (grid mode only): the state's P values are split among the
// blocks V at a time. Forward: each block also keeps V rows of W_hr (K = H,
// rows of ldm values), and W_hh's rows have K = P. Backward: each block keeps
// the V columns of W_hh of its state values (K = G*H) and the U columns of
// W_hr of its units (K = P, rows of ldm values).
// ok: it fits (shared memory, blocks, cooperative or cluster launch).
struct PersistentLayout {
  int U = 0, blocks = 0, ld = 0, bc = 0, ks = 1, cluster = 0;
  int V = 0, ldm = 0;  // projection only
  std::size_t smem = 0;
  bool ok = false;
};
PersistentLayout persistent_layout(const Problem& p, bool backward);

// Benchmark mode (Algo::Benchmark, FUSEDRNN_CUDA_ALGO=benchmark). The first
// call with a key times each variant that can run it (the standard
// algorithm; the persistent kernels in grid mode where they fit, and in
// cluster mode where that fits too) on the call's stream: each once untimed,
// then twice, interleaved, between CUDA events; the smaller of a candidate's
// two times counts, and a later candidate must be strictly faster to win. The
// call then returns the winner's results (it runs last), and later calls
// with the key run the winner without timing. Forward (inference and
// training apart) and backward are timed separately, so a training step may
// run forward with one variant and backward with another. The key is the
// problem's shape and options, not the values of lengths or mask. A stream
// being captured into a CUDA graph cannot be timed: such a call runs
// Algo::Auto's pick and records nothing.
struct TuneKey {
  int pass = 0;  // 0: forward, inference; 1: forward, training; 2: backward
  int device = 0;
  Cell cell = Cell::Lstm;
  DType dtype = DType::F32;
  int64_t T = 0, B = 0, I = 0, H = 0, P = 0, checkpoint = 0;
  bool lengths = false, mask = false, reverse = false, batch_first = false;
  int units = 1;  // FUSEDRNN_CUDA_PERSISTENT_UNITS
  bool operator<(const TuneKey& o) const;
};
enum class Variant : int { Standard = 0, Grid = 1, Cluster = 2 };  // Grid, Cluster: persistent
struct Tuned {
  Variant pick = Variant::Standard;
  float ms[3] = {-1.f, -1.f, -1.f};  // per variant, the time that decided (-1: not a candidate)
};
std::vector<std::pair<TuneKey, Tuned>> benchmark_table();
void benchmark_clear();

// Forward. cache is null for inference, else a Cache made for (p, in), which
// forward fills. y [T, B, P] (or [B, T, P]), h_n [B, P], c_n [B, H] (lstm).
void forward(const Problem& p, const ForwardIn& in, void* y, void* h_n, void* c_n, Cache* cache,
             Algo algo);

struct Grads {
  void *x = nullptr, *h0 = nullptr, *c0 = nullptr, *w_ih = nullptr, *w_hh = nullptr,
       *b_ih = nullptr, *b_hh = nullptr, *w_hr = nullptr;
};

// Backward through a cache, on stream (the caller's). dy [T, B, P] in y's
// layout, dh_n [B, P], dc_n [B, H]; each may be null (zeros). The weight and
// bias gradients (w_hr's with projection) are always written; x, h0 and c0
// (lstm) only where not null: a null one is not wanted, and without h0 the
// first step's recurrent product, which gives only dh0, is skipped.
void backward(const Cache& cache, cudaStream_t stream, const void* dy, const void* dh_n,
              const void* dc_n, const Grads& g);

// Errors from the CUDA runtime become std::runtime_error with the call named
// (std::bad_alloc for an allocation failure).
void check(cudaError_t e, const char* what);

// Makes dev the current device for a scope, then restores the previous one.
struct DeviceGuard {
  explicit DeviceGuard(int dev);
  ~DeviceGuard();
  int prev = -1;
};

// Stream-ordered device memory: allocated on device in stream's order; freed
// in the order of the stream that used it last (cudaFree if that fails).
void* device_alloc(std::size_t nbytes, int device, cudaStream_t stream);
void device_free(void* mem, int device, cudaStream_t stream) noexcept;

}  // namespace cuda
}  // namespace fusedrnn
