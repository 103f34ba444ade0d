// fusedrnn: CUDA recurrent layers, the standard algorithm.
//
// Forward: one GEMM for the input projection of all N = T*B rows, then per
// step one GEMM for the recurrent product of the rows still running and one
// fused pointwise kernel (biases, gate nonlinearities, state update, the
// lengths/mask rule, y and the saved values for backward).
// Backward: per step (reverse order) one fused pointwise kernel (the cell's
// gradient, written as dgates) and one GEMM dh += dgates W_hh; then dx, dW_ih
// and dW_hh as one GEMM each over all rows, and the bias gradients as
// two-pass column sums (fixed order, no atomics: deterministic).
// Arithmetic is float32 throughout; float16/bfloat16 arrays are read and
// written in their own type (the state h too, as the input of the next
// step's product), the LSTM cell state and the saved gates stay float32.
// With projection (lstm, w_hr) each step adds the product h = m W_hr^T
// forward and dm = dh W_hr backward, and dW_hr is deferred like the others.
// A checkpointed cache keeps the state every k steps; backward recomputes
// each segment with the algorithm forward ran before the segment's steps.
#include "rnn_cuda.h"

#include "runtime.h"

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "cublas_dyn.h"

namespace fusedrnn {
namespace cuda {

void check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the sticky-free error so later calls work
    throw std::bad_alloc();
  }
  throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(e) + " (" +
                           cudaGetErrorString(e) + ")");
}

DeviceGuard::DeviceGuard(int dev) {
  check(cudaGetDevice(&prev), "cudaGetDevice");
  if (prev != dev) check(cudaSetDevice(dev), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  int cur = -1;
  if (cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
}

void* device_alloc(std::size_t nbytes, int device, cudaStream_t stream) {
  DeviceGuard guard(device);
  void* m = nullptr;
  check(cudaMallocAsync(&m, nbytes, stream), "cudaMallocAsync");
  return m;
}

void device_free(void* mem, int device, cudaStream_t stream) noexcept {
  if (!mem) return;
  int prev = -1;
  const bool switched = cudaGetDevice(&prev) == cudaSuccess && prev != device;
  if (switched) cudaSetDevice(device);
  if (cudaFreeAsync(mem, stream) != cudaSuccess) {
    cudaGetLastError();
    cudaFree(mem);
  }
  if (switched) cudaSetDevice(prev);
}

namespace {

// ---------------------------------------------------------------- helpers


// Stream-ordered scratch memory, freed (in stream order) when it goes out of scope.
class Scratch {
 public:
  explicit Scratch(cudaStream_t s) : stream_(s) {}
  ~Scratch() {
    for (void* p : ptrs_) cudaFreeAsync(p, stream_);
  }
  template <typename T>
  T* alloc(int64_t n) {
    if (n <= 0) return nullptr;
    void* p = nullptr;
    check(cudaMallocAsync(&p, checked_mul(static_cast<std::size_t>(n), sizeof(T)), stream_),
          "cudaMallocAsync");
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }

 private:
  cudaStream_t stream_;
  std::vector<void*> ptrs_;
};

template <typename T> struct BlasType;
template <> struct BlasType<float> { static constexpr blas::Type v = blas::R32F; };
template <> struct BlasType<__half> { static constexpr blas::Type v = blas::R16F; };
template <> struct BlasType<__nv_bfloat16> { static constexpr blas::Type v = blas::R16BF; };

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Device math policy for the cell headers: float32, the same saturating
// sigmoid as the CPU's ScalarMath.
struct DevMath {
  using T = float;
  using S = float;
  static __device__ __forceinline__ float sigmoid(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    const float e = expf(x);
    return e / (1.f + e);
  }
  static __device__ __forceinline__ float tanh(float x) { return tanhf(x); }
  static __device__ __forceinline__ float relu(float x) { return x < 0.f ? 0.f : x; }
  static __device__ __forceinline__ float relu_grad(float y) { return y > 0.f ? 1.f : 0.f; }
};

constexpr int kThreads = 256;
inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// Gates per cell (lstm 4, gru 3, the Elman cells 1), for the kernels' templates.
template <Cell C>
constexpr int kGates = C == Cell::Lstm ? 4 : C == Cell::Gru ? 3 : 1;

__device__ __forceinline__ bool valid_step(const int32_t* lengths, const uint8_t* mask, int64_t t,
                                           int64_t B, int64_t b) {
  if (lengths) return t < lengths[b];
  if (mask) return mask[t * B + b] != 0;
  return true;
}

// ----------------------------------------------------------- small kernels

// dst[b*ld + j] = src[b*H + j] (or 0 when src is null), b < B, j < H.
template <typename T>
__global__ void set_rows(T* dst, int64_t ld, const T* src, int64_t B, int64_t H) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= B * H) return;
  const int64_t b = i / H, j = i % H;
  dst[b * ld + j] = src ? src[i] : from_f<T>(0.f);
}

template <typename Tin>
__global__ void to_float(const Tin* src, float* dst, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) dst[i] = src ? to_f(src[i]) : 0.f;
}

template <typename Tout>
__global__ void from_float(const float* src, Tout* dst, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) dst[i] = from_f<Tout>(src[i]);
}

// dst[i * W + j] = src[rows[i] * ld + j], i < n, j < W: rows gathered into a
// packed block (see RunningRows).
template <typename T>
__global__ void gather_rows(T* dst, const T* src, int64_t ld, const int32_t* rows, int64_t n,
                            int64_t W) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * W) return;
  dst[i] = src[rows[i / W] * ld + i % W];
}

// dst[rows[i] * ld + j] = src[i * W + j], i < n, j < W: packed rows back to
// their places (rows are distinct).
template <typename T>
__global__ void scatter_rows(T* dst, int64_t ld, const T* src, const int32_t* rows, int64_t n,
                             int64_t W) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * W) return;
  dst[rows[i / W] * ld + i % W] = src[i];
}

// dst[rows[i] * ld + j] += src[i * W + j], i < n, j < W (rows are distinct).
__global__ void scatter_add_rows(float* dst, int64_t ld, const float* src, const int32_t* rows,
                                 int64_t n, int64_t W) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * W) return;
  dst[rows[i / W] * ld + i % W] += src[i];
}

// Column sums of a [rows, cols] matrix in two fixed-order passes.
template <typename Tin>
__global__ void colsum_partial(const Tin* a, int64_t rows, int64_t cols, int64_t chunk,
                               double* part) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  const int64_t r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
  double s = 0.0;
  for (int64_t r = r0; r < r1; ++r) s += static_cast<double>(to_f(a[r * cols + col]));
  part[blockIdx.y * cols + col] = s;
}

template <typename Tout>
__global__ void colsum_final(const double* part, int64_t nchunks, int64_t cols, Tout* out) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  double s = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) s += part[c * cols + col];
  out[col] = from_f<Tout>(static_cast<float>(s));
}

template <typename T>
void colsum(Scratch& scratch, cudaStream_t st, const T* a, int64_t rows, int64_t cols, T* out) {
  if (cols == 0) return;
  const int64_t chunk = std::max<int64_t>(256, (rows + 1023) / 1024);
  const int64_t nch = std::max<int64_t>(1, (rows + chunk - 1) / chunk);
  double* part = scratch.alloc<double>(nch * cols);
  dim3 grid(blocks_for(cols), static_cast<unsigned>(nch));
  FUSEDRNN_LAUNCH(grid, kThreads, 0, st, colsum_partial<T>)(a, rows, cols, chunk, part);
  FUSEDRNN_LAUNCH(blocks_for(cols), kThreads, 0, st, colsum_final<T>)(part, nch, cols, out);
}

// ------------------------------------------------------ pointwise kernels

struct FwdStep {
  int64_t B, H, P, t, row0, bstride;  // P: the state's width (H without projection)
  int64_t srow0, sstride;  // row b's saved values (gates) at row srow0 + b * sstride
  const float* gx;  // [rows, G*H]: x's row order, or packed (prow), from row gx_row0 on
  int64_t gx_row0;
  const int32_t* prow;  // [T*B]: (t, b)'s packed row, or null (see RunningRows)
  const float* gh;  // [B, G*H]: this step's recurrent product (rows of running steps)
  const int32_t* ghslot;  // [B] row b's row of gh, or null: row b (see RunningRows)
  const void *b_ih, *b_hh;
  const void* hprev;  // state entering the step: (b, j) at hprev[b*hprev_ld + j]
  int64_t hprev_ld;
  void* hnext;  // where the next step reads its state (null at the last step)
  int64_t hnext_ld;
  const float* cprev;  // lstm cell entering the step
  int64_t cprev_ld;
  float* cnext;  // lstm cell after the step
  int64_t cnext_ld;
  float* gates;  // training: [rows, saved_width*H] at the saved row; else null
  void* y;       // [N, P] at row r, or null (a checkpointed backward's recomputation)
  void *h_n, *c_n;  // last step only
  const int32_t* lengths;
  const uint8_t* mask;
  // Projection (lstm with w_hr), else null: the cell writes o * tanh(c) of its
  // valid rows to m (rows as gx's), and proj_fwd_step makes the new state
  // from hproj = m W_hr^T, the step's product ([rows, P], slot as gh).
  void* m;
  const float* hproj;
};

// Element (b, k) of a step's new state hv, width W (H, or P with projection):
// the next step's state, y (0 at a padded step with lengths; the carried
// state at a masked one) and h_n at the last step.
template <typename Tio>
__device__ __forceinline__ void store_state(const FwdStep& s, int64_t b, int64_t k, int64_t W,
                                            bool valid, Tio hv) {
  if (s.hnext) static_cast<Tio*>(s.hnext)[b * s.hnext_ld + k] = hv;
  const int64_t r = s.row0 + b * s.bstride;
  if (s.y) static_cast<Tio*>(s.y)[r * W + k] = (valid || !s.lengths) ? hv : from_f<Tio>(0.f);
  if (s.h_n) static_cast<Tio*>(s.h_n)[b * W + k] = hv;
}

// What a forward step reads for element (b, j) before its recurrent product:
// whether the step is valid, the state and LSTM cell entering it, and for a
// valid step the input-side pre-activations with b_ih, and b_hh. The
// persistent kernel loads them for the next step before the grid barrier.
template <Cell C>
struct FwdIn {
  static constexpr int G = kGates<C>;
  bool valid;
  float h, c;
  float xa[G], bh[G];
  int64_t grow;  // the row of gx (valid steps only)
};

template <Cell C, typename Tio>
__device__ __forceinline__ FwdIn<C> fwd_load(const FwdStep& s, int64_t b, int64_t j) {
  constexpr int G = FwdIn<C>::G;
  const int64_t H = s.H;
  FwdIn<C> in{};
  in.valid = valid_step(s.lengths, s.mask, s.t, s.B, b);
  // With projection the state (width P) is proj_fwd_step's; here only the cell.
  const bool proj = C == Cell::Lstm && s.m;
  in.h = proj ? 0.f : to_f(static_cast<const Tio*>(s.hprev)[b * s.hprev_ld + j]);
  in.c = C == Cell::Lstm ? s.cprev[b * s.cprev_ld + j] : 0.f;
  if (in.valid) {
    in.grow = s.prow ? s.prow[s.t * s.B + b] : s.row0 + b * s.bstride;
    const float* gx = s.gx + (in.grow - s.gx_row0) * G * H + j;
    const Tio* bi = static_cast<const Tio*>(s.b_ih);
    const Tio* bh = static_cast<const Tio*>(s.b_hh);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      in.xa[g] = gx[g * H] + (bi ? to_f(bi[g * H + j]) : 0.f);
      in.bh[g] = bh ? to_f(bh[g * H + j]) : 0.f;
    }
  }
  return in;
}

// The rest of a forward step for element (b, j), given fwd_load's values and
// the recurrent product gh[g] of each gate (read for valid steps only).
// Returns the new state (without projection), as stored.
template <Cell C, typename Tio>
__device__ __forceinline__ Tio fwd_finish(const FwdStep& s, int64_t b, int64_t j,
                                          const FwdIn<C>& in, const float (&gh)[FwdIn<C>::G]) {
  constexpr int G = FwdIn<C>::G;
  const int64_t H = s.H, i = b * H + j;
  const bool proj = C == Cell::Lstm && s.m;
  float h_new = in.h, c_new = in.c;
  const int64_t sr = s.srow0 + b * s.sstride;
  if (in.valid) {
    const float* xa = in.xa;
    float ha[G];
#pragma unroll
    for (int g = 0; g < G; ++g) ha[g] = gh[g] + in.bh[g];
    if constexpr (C == Cell::Lstm) {
      using L = cell::Lstm<DevMath>;
      const auto q = L::gates(xa[0] + ha[0], xa[1] + ha[1], xa[2] + ha[2], xa[3] + ha[3]);
      c_new = L::forward(q, c_new, &h_new);
      if (s.gates) {
        float* gs = s.gates + sr * 4 * H + j;
        gs[0] = q.i; gs[H] = q.f; gs[2 * H] = q.g; gs[3 * H] = q.o;
      }
      if (proj) static_cast<Tio*>(s.m)[in.grow * H + j] = from_f<Tio>(h_new);
    } else if constexpr (C == Cell::Gru) {
      using R = cell::Gru<DevMath>;
      const auto q = R::gates(xa[0], xa[1], xa[2], ha[0], ha[1], ha[2]);
      h_new = R::forward(q, h_new);
      if (s.gates) {
        float* gs = s.gates + sr * 4 * H + j;
        gs[0] = q.r; gs[H] = q.z; gs[2 * H] = q.n; gs[3 * H] = ha[2];
      }
    } else {
      h_new = cell::Rnn<C, DevMath>::forward(xa[0] + ha[0]);
      if (s.gates) s.gates[sr * H + j] = h_new;
    }
  }
  if constexpr (C == Cell::Lstm) {
    if (s.cnext) s.cnext[b * s.cnext_ld + j] = c_new;
    if (s.c_n) static_cast<Tio*>(s.c_n)[i] = from_f<Tio>(c_new);
  }
  // (a carried state goes back to its own type unchanged)
  const Tio hv = from_f<Tio>(h_new);
  if (!proj) store_state<Tio>(s, b, j, H, in.valid, hv);
  return hv;
}

template <Cell C, typename Tio>
__global__ void fwd_step(FwdStep s) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= s.B * s.H) return;
  constexpr int G = FwdIn<C>::G;
  const int64_t b = i / s.H, j = i % s.H;
  const FwdIn<C> in = fwd_load<C, Tio>(s, b, j);
  float gh[G];
  // (a row that does not run has no product: its slot may be -1)
  const float* ghp = in.valid ? s.gh + (s.ghslot ? s.ghslot[b] : b) * G * s.H + j : nullptr;
#pragma unroll
  for (int g = 0; g < G; ++g) gh[g] = ghp ? ghp[g * s.H] : 0.f;
  fwd_finish<C, Tio>(s, b, j, in, gh);
}

// The state of a projected LSTM step, element (b, k), k < P: the step's
// product hproj for a valid row, else the carried state; then the next step's
// state, y and h_n as fwd_finish writes them without projection.
template <typename Tio>
__global__ void proj_fwd_step(FwdStep s) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= s.B * s.P) return;
  const int64_t P = s.P, b = i / P, k = i % P;
  const bool valid = valid_step(s.lengths, s.mask, s.t, s.B, b);
  const Tio hv = valid ? from_f<Tio>(s.hproj[(s.ghslot ? s.ghslot[b] : b) * P + k])
                       : static_cast<const Tio*>(s.hprev)[b * s.hprev_ld + k];
  store_state<Tio>(s, b, k, P, valid, hv);
}

// Where each step's state lives, shared by the host loops and the persistent
// kernels. Training (hs set): hs holds the state entering every step, cs the
// LSTM cell after every step (with the saved gates: the saved values), c0f
// the cell entering step s0. Inference (and a checkpointed forward): the
// state ping-pongs between hbuf0/hbuf1 and cbuf0/cbuf1 (cbuf0 holds c0).
// Steps run s = 0..T-1 in processing order, t = p.t_of(s).
struct StateBuffers {
  Problem p;  // sizes, direction and layout
  void* hs;
  void *hbuf0, *hbuf1;
  float *cs, *cbuf0, *cbuf1, *c0f;
  void *h_n, *c_n;  // written by the last step
  // The steps whose values hs, cs and the gates hold: every step in x's row
  // order (s1 < 0), or one segment [s0, s1) of a checkpointed backward, in
  // its own rows, step by step: (s - s0) * B + b.
  int64_t s0 = 0, s1 = -1;
};

// The saved row of (step s, batch row 0), and the stride between batch rows.
__host__ __device__ __forceinline__ int64_t saved_row0(const StateBuffers& sb, int64_t s) {
  return sb.s1 < 0 ? sb.p.row0(sb.p.t_of(s)) : (s - sb.s0) * sb.p.B;
}
__host__ __device__ __forceinline__ int64_t saved_stride(const StateBuffers& sb) {
  return sb.s1 < 0 ? sb.p.bstride() : 1;
}

// Points a forward step s at its state buffers (t, row0, hprev/hnext,
// cprev/cnext, and h_n/c_n at the last step).
template <typename Tio>
__host__ __device__ __forceinline__ void place_fwd(FwdStep& f, const StateBuffers& sb, int64_t s) {
  const Problem& p = sb.p;
  // h rows have the state's width P, c rows the cell's H
  const int64_t T = p.T, H = p.H, P = p.P, t = p.t_of(s), ss = saved_stride(sb);
  const int64_t hld = ss * P, cld = ss * H, end = sb.s1 < 0 ? T : sb.s1;
  f.t = t;
  f.row0 = p.row0(t);
  f.srow0 = saved_row0(sb, s);
  f.sstride = ss;
  if (sb.hs) {
    Tio* hs = static_cast<Tio*>(sb.hs);
    f.hprev = hs + f.srow0 * P; f.hprev_ld = hld;
    f.hnext = s + 1 < end ? hs + saved_row0(sb, s + 1) * P : nullptr; f.hnext_ld = hld;
    if (sb.cs) {
      f.cprev = s == sb.s0 ? sb.c0f : sb.cs + saved_row0(sb, s - 1) * H;
      f.cprev_ld = s == sb.s0 ? H : cld;
      f.cnext = sb.cs + f.srow0 * H; f.cnext_ld = cld;
    }
  } else {
    f.hprev = (s & 1) ? sb.hbuf1 : sb.hbuf0; f.hprev_ld = P;
    f.hnext = (s & 1) ? sb.hbuf0 : sb.hbuf1; f.hnext_ld = P;
    if (sb.cbuf0) {
      f.cprev = (s & 1) ? sb.cbuf1 : sb.cbuf0; f.cprev_ld = H;
      f.cnext = (s & 1) ? sb.cbuf0 : sb.cbuf1; f.cnext_ld = H;
    }
  }
  f.h_n = s + 1 == T ? sb.h_n : nullptr;
  f.c_n = s + 1 == T ? sb.c_n : nullptr;
}

// ------------------------------------------- the persistent kernels' products
//
// Both persistent kernels multiply, every step, their block's slice of W_hh
// (in shared memory for the whole sequence) by a few vectors staged in shared
// memory at the step: out[ks][b][r] = sum over k in part ks of W[r][k] X[b][k].
// Rows are padded with zeros to a whole number of 16-byte vectors, so every
// load is one 16-byte load (4 float32 or 8 16-bit values). A warp computes a
// tile of kRT rows by kBT vectors, lanes along k: each W load serves kBT
// products and each X load kRT. Its kRT * kBT sums are then reduced across
// the warp by recursive halving (31 shuffles for the 32 sums, where one
// butterfly per sum would take 160), which leaves lane l with sum l. When the
// tiles are fewer than the warps, k is split into ks parts, one per warp, and
// the consumer adds the parts in order.

constexpr int kRT = 4, kBT = 8;  // a warp's tile: rows of W by vectors X
constexpr int kPrefetch = 2;  // pointwise elements per thread whose inputs are loaded early

#ifdef FUSEDRNN_CUDA_EMULATE
using ::emu::Bytes16;
using ::emu::load16;
using ::emu::store16;
template <typename Tio>
inline Tio lane_of(const Bytes16& v, int i) {
  Tio e;
  std::memcpy(&e, v.b + i * sizeof(Tio), sizeof(Tio));
  return e;
}
#else
using Bytes16 = uint4;
__device__ __forceinline__ Bytes16 load16(const void* p) { return *static_cast<const uint4*>(p); }
__device__ __forceinline__ void store16(void* p, const Bytes16& v) { *static_cast<uint4*>(p) = v; }
template <typename Tio>
__device__ __forceinline__ Tio lane_of(const Bytes16& v, int i) {
  return reinterpret_cast<const Tio*>(&v)[i];
}
#endif

template <typename Tio>
constexpr int kVec = 16 / static_cast<int>(sizeof(Tio));  // values per 16-byte vector

template <typename Tio>
__device__ __forceinline__ void load_vec(const Tio* p, float (&v)[kVec<Tio>]) {
  const Bytes16 raw = load16(p);
#pragma unroll
  for (int i = 0; i < kVec<Tio>; ++i) v[i] = to_f(lane_of<Tio>(raw, i));
}

// Sums each of the NV values over the warp's lanes by recursive halving: at
// each stage a lane keeps half of its N values and hands the other half to
// its partner. Returns to lane l the total of value l / (32 / NV).
template <int N, int NV>
__device__ __forceinline__ void halve_stage(float (&v)[NV], int lane) {
  if constexpr (N > 1) {
    constexpr int off = 16 * N / NV, h = N / 2;
    const bool hi = (lane & off) != 0;
#pragma unroll
    for (int i = 0; i < h; ++i) {
      const float send = hi ? v[i] : v[i + h];
      v[i] = (hi ? v[i + h] : v[i]) + __shfl_xor_sync(0xffffffffu, send, off);
    }
    halve_stage<h, NV>(v, lane);
  }
}

template <int NV>
__device__ __forceinline__ float warp_sum_spread(float (&v)[NV], int lane) {
  static_assert(NV >= 1 && NV <= 32 && (NV & (NV - 1)) == 0, "NV: a power of 2 up to 32");
  halve_stage<NV, NV>(v, lane);
  float s = v[0];
#pragma unroll
  for (int off = 16 / NV; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

// The block's products for vectors [b_lo, b_hi): W [rows][ld] and X (row b at
// X + (b - b_lo) * ld) in shared memory, ld a multiple of the vector with
// zeros past the data. Writes out[ks * out_part + b * out_ld + r]. Tiles for
// which skip(b0, n) holds (no vector of b0..b0+n-1 runs) are left out.
template <typename Tio, typename Skip>
__device__ __forceinline__ void block_products(const Tio* W, const Tio* X, int ld, int rows,
                                               int b_lo, int b_hi, int parts, float* out,
                                               int out_ld, int64_t out_part, Skip skip) {
  constexpr int V = kVec<Tio>, NV = kRT * kBT, SPREAD = 32 / NV;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int rtiles = (rows + kRT - 1) / kRT, btiles = (b_hi - b_lo + kBT - 1) / kBT;
  // each part: a whole number of the warp's 32 vectors
  const int part = ((ld / V + parts - 1) / parts + 31) / 32 * 32 * V;
  for (int o = warp; o < rtiles * btiles * parts; o += nwarps) {
    const int ks = o % parts, tile = o / parts;
    const int r0 = tile / btiles * kRT, b0 = b_lo + tile % btiles * kBT;
    const int nr = min(kRT, rows - r0), nb = min(kBT, b_hi - b0);
    if (skip(b0, nb)) continue;
    float acc[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) acc[i] = 0.f;
    const int k_end = min(ld, (ks + 1) * part);
    for (int k = ks * part + lane * V; k < k_end; k += 32 * V) {
      float w[kRT][V];
#pragma unroll
      for (int ri = 0; ri < kRT; ++ri) load_vec<Tio>(W + (r0 + min(ri, nr - 1)) * ld + k, w[ri]);
#pragma unroll
      for (int bi = 0; bi < kBT; ++bi) {
        if (bi < nb) {
          float x[V];
          load_vec<Tio>(X + (b0 - b_lo + bi) * ld + k, x);
#pragma unroll
          for (int ri = 0; ri < kRT; ++ri)
            if (ri < nr)
#pragma unroll
              for (int v = 0; v < V; ++v) acc[ri * kBT + bi] = fmaf(w[ri][v], x[v], acc[ri * kBT + bi]);
        }
      }
    }
    const float sum = warp_sum_spread<NV>(acc, lane);
    const int idx = lane / SPREAD, ri = idx / kBT, bi = idx % kBT;
    if (lane % SPREAD == 0 && ri < nr && bi < nb)
      out[ks * out_part + static_cast<int64_t>(b0 + bi) * out_ld + r0 + ri] = sum;
  }
}

// Copies n values from global memory (src) to shared memory (dst, 16-byte
// aligned) by one warp: 16-byte moves when vec, else one value per lane.
template <typename Tio>
__device__ __forceinline__ void warp_copy(Tio* dst, const Tio* src, int n, bool vec, int lane) {
  constexpr int V = kVec<Tio>;
  if (vec)
    for (int k = lane * V; k < n; k += 32 * V) store16(dst + k, load16(src + k));
  else
    for (int k = lane; k < n; k += 32) dst[k] = src[k];
}

// Whether n values at p, rows ld apart, can move as 16-byte vectors.
template <typename Tio>
__device__ __forceinline__ bool vec_ok(const void* p, int64_t n, int64_t ld) {
  constexpr int V = kVec<Tio>;
  return n % V == 0 && ld % V == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Whether no batch row of [b0, b0 + n) runs at step t (a tile to leave out).
__device__ __forceinline__ bool none_run(const int32_t* lengths, const uint8_t* mask, int64_t t,
                                         int64_t B, int b0, int n) {
  for (int i = 0; i < n; ++i)
    if (valid_step(lengths, mask, t, B, b0 + i)) return false;
  return true;
}

// Zeros the pads [from, ld) of n rows ld apart in shared memory, by warps.
template <typename Tio>
__device__ __forceinline__ void zero_pads(Tio* rows, int n, int from, int ld) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const Tio zero = from_f<Tio>(0.f);
  for (int r = warp; r < n; r += nwarps)
    for (int k = from + lane; k < ld; k += 32) rows[static_cast<int64_t>(r) * ld + k] = zero;
}

// A product's value from its parts (stride apart), added in order.
__device__ __forceinline__ float sum_parts(const float* p, int parts, int64_t stride) {
  float v = p[0];
  for (int ks = 1; ks < parts; ++ks) v += p[ks * stride];
  return v;
}

// A persistent kernel's pointwise elements e < n: element e goes to thread
// e mod blockDim at every step, so a thread reads next the state it wrote.
// load_points loads the inputs of a thread's first kPrefetch elements into
// pre (a step early); finish_points runs finish(e, in) on all of its
// elements, loading the others' inputs in place with load(e).
template <typename In, typename Load>
__device__ __forceinline__ void load_points(In (&pre)[kPrefetch], int n, Load load) {
#pragma unroll
  for (int q = 0; q < kPrefetch; ++q) {
    const int e = threadIdx.x + q * blockDim.x;
    if (e < n) pre[q] = load(e);
  }
}

template <typename In, typename Load, typename Finish>
__device__ __forceinline__ void finish_points(const In (&pre)[kPrefetch], int n, Load load,
                                              Finish finish) {
#pragma unroll
  for (int q = 0; q < kPrefetch; ++q) {
    const int e = threadIdx.x + q * blockDim.x;
    if (e < n) finish(e, pre[q]);
  }
  for (int e = threadIdx.x + kPrefetch * blockDim.x; e < n; e += blockDim.x) finish(e, load(e));
}

// Cluster launches (sm_90 and later; the host emulator): the barrier of the
// cluster's blocks, and where p (in this block's shared memory) is in block
// rank's. Compiled for an older GPU they trap: the host launches a cluster
// only on a device of compute capability 9 or more.
__device__ __forceinline__ void cluster_barrier() {
#if defined(FUSEDRNN_CUDA_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  cooperative_groups::this_cluster().sync();
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, int rank) {
#if defined(FUSEDRNN_CUDA_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
#if defined(__CUDA_ARCH__)
  __trap();
#endif
  return p;
#endif
}

// ------------------------------------------------- persistent forward
//
// One cooperative launch runs every step. Block k owns hidden units
// [k*U, k*U + U): it keeps their G*U rows of W_hh in shared memory for the
// whole sequence. Per step it stages the previous state of the rows that
// run (bc batch rows at a time) in shared memory, computes its rows'
// recurrent products (block_products), runs the pointwise math of its units,
// writes the new state to global memory, loads what the next step's
// pointwise math reads, and meets the other blocks at a grid-wide barrier.
// Rows whose step is not valid skip their products. The state buffers, y and
// the saved values are exactly those of the standard algorithm, so backward
// is shared.
//
// Cluster mode (layout.cluster > 0, sm_90): the grid is one thread-block
// cluster, whose blocks keep the whole batch's state in two buffers of
// shared memory. Each block writes its units' new state straight into every
// block's other buffer (distributed shared memory) and the blocks meet at the
// cluster's barrier, which is cheaper than a grid-wide one; no block stages
// the state from global memory after the first step.

#ifdef FUSEDRNN_CUDA_EMULATE
constexpr int kPersistentThreads = 64;  // two warps: fewer fibers for the host emulator
#else
constexpr int kPersistentThreads = 256;
#endif

// Cluster sizes the cluster mode tries: the portable 8, then 16 (sm_90's
// largest, allowed per kernel), for a W_hh that 8 blocks cannot hold.
constexpr int kClusterSizes[] = {8, 16};

// The layout for a problem: forward multiplies G*U rows of W_hh by the state
// (K = P, which is H without projection) and, with projection, V rows of
// W_hr by the step's o * tanh(c) (K = H, rows of ldm values). Backward
// multiplies columns of W_hh by the gate gradients (K = G*H): U, one per
// unit, or with projection V, one per value of the state, and then U columns
// of W_hr by the state's gradients (K = P, rows of ldm values).
// cluster: the cluster mode's, one cluster of up to that many blocks (0: grid mode).
PersistentLayout layout_for(const Problem& p, bool backward, int cluster) {
  PersistentLayout c;
  if (p.B < 1 || p.H < 1 || p.T < 1) return c;
  if (p.proj && (cluster || p.P < 1)) return c;  // (projection: grid mode only)
  int sms = 0, optin = 0, launch = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p.device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.device) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&launch, cluster ? cudaDevAttrClusterLaunch : cudaDevAttrCooperativeLaunch,
                             p.device) != cudaSuccess) {
    cudaGetLastError();
    return c;
  }
  if (cluster) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, p.device) != cudaSuccess) {
      cudaGetLastError();
      return c;
    }
    if (major < 9) return c;
  }
  const int64_t es = static_cast<int64_t>(dtype_size(p.dtype)), V = 16 / es, G = p.G(), H = p.H;
  // One block per multiprocessor (cluster: per block of the cluster), or
  // fewer with more units each when FUSEDRNN_CUDA_PERSISTENT_UNITS asks for
  // at least that many per block (a benchmark knob, as FUSEDRNN_CUDA_ALGO:
  // fewer blocks meet at the barrier).
  const char* umin_env = std::getenv("FUSEDRNN_CUDA_PERSISTENT_UNITS");
  const int64_t umin = umin_env ? std::max(1, std::atoi(umin_env)) : 1;
  const int64_t per = cluster ? std::min<int64_t>(sms, cluster) : sms;
  const int64_t U = std::min(H, std::max((H + per - 1) / per, umin));
  const int64_t K = backward ? G * H : p.P, ld = (K + V - 1) / V * V;
  const int64_t blocks = (H + U - 1) / U;
  // projection: PV of the state's values per block; the second product's rows
  const int64_t PV = p.proj ? (p.P + blocks - 1) / blocks : 0;
  const int64_t K2 = backward ? p.P : H, ldm = p.proj ? (K2 + V - 1) / V * V : 0;
  // rows of the products with rows of ld values, and of those with ldm values
  const int64_t rows = backward ? (p.proj ? PV : U) : G * U;
  const int64_t rows2 = p.proj ? (backward ? U : PV) : 0;
  const int64_t w = (rows * ld + rows2 * ldm) * es, avail = optin;
  // a staged vector's room, and the products per vector
  const int64_t lds = std::max(ld, ldm), prods = std::max(rows, rows2);
  const int64_t warps = kPersistentThreads / 32, nbuf = cluster ? 2 : 1;
  auto fit_bc = [&](int64_t ks) {  // vectors staged at once, with ks parts of products
    const int64_t left = avail - w - ks * p.B * prods * 4;
    const int64_t n = left < nbuf * lds * es ? 0 : std::min(p.B, left / (nbuf * lds * es));
    return cluster && n < p.B ? int64_t{0} : n;  // (cluster: the whole batch)
  };
  int64_t ks = 1, bc = fit_bc(1);
  if (bc < 1) return c;
  const int64_t tiles = (rows + kRT - 1) / kRT * ((bc + kBT - 1) / kBT);
  ks = std::max<int64_t>(1, std::min(warps / tiles, (ld / V + 31) / 32));
  while (ks > 1 && fit_bc(ks) < bc) --ks;  // split k only where it costs no staging room
  c.U = static_cast<int>(U);
  c.blocks = static_cast<int>(blocks);
  c.ld = static_cast<int>(ld);
  c.V = static_cast<int>(PV);
  c.ldm = static_cast<int>(ldm);
  c.bc = static_cast<int>(bc);
  c.ks = static_cast<int>(ks);
  c.cluster = cluster ? c.blocks : 0;
  c.smem = static_cast<std::size_t>(w + nbuf * bc * lds * es + ks * p.B * prods * 4);
  c.ok = launch && c.blocks <= (cluster ? cluster : sms) && lds <= INT32_MAX / 2 &&
         c.smem <= static_cast<std::size_t>(optin);
  return c;
}

// A checkpointed forward's kept states: the state entering steps 0, k, 2k, ...
// (processing order), h of the array type, the LSTM cell in float32.
struct Checkpoints {
  int64_t k = 0;
  void* h = nullptr;   // [ceil(T/k), B, P]
  float* c = nullptr;  // [ceil(T/k), B, H] (lstm)
};

// The steps a persistent kernel runs: sb's segment [s0, s1), or all T.
__host__ __device__ __forceinline__ int64_t steps_end(const StateBuffers& sb) {
  return sb.s1 < 0 ? sb.p.T : sb.s1;
}

struct PersistentParams {
  FwdStep step;  // the per-step fields are set by place_fwd in the kernel
  StateBuffers sb;  // (its segment: the steps to run)
  const void* w_hh;
  Checkpoints ck;  // a checkpointed forward: where the state every ck.k steps goes
  PersistentLayout c;  // (set at launch)
  const void* w_hr = nullptr;  // projection: [P, H] (step.m: where o * tanh(c) goes)
};

std::mutex& persistent_launch_mutex() {
  static std::mutex m;
  return m;
}

PersistentLayout persistent_config(const Problem& p) { return persistent_layout(p, false); }

// Stages n values of a vector (src) in a row of ld values in shared memory,
// by one warp; with pads, zeros go in the row's pad [n, ld) too (rooms that
// hold rows of two padded lengths; others are zeroed once, at the start).
template <typename Tio>
__device__ __forceinline__ void stage_row(Tio* dst, const Tio* src, int n, int ld, bool vec,
                                          int lane, bool pads = true) {
  warp_copy<Tio>(dst, src, n, vec, lane);
  const Tio zero = from_f<Tio>(0.f);
  for (int k = n + lane; pads && k < ld; k += 32) dst[k] = zero;
}

template <Cell C, typename Tio>
__global__ void __launch_bounds__(kPersistentThreads, 1) persistent_fwd(PersistentParams a) {
  constexpr int G = FwdIn<C>::G;
  FUSEDRNN_SHARED_BYTES(smem_raw);
  const int64_t H = a.step.H, B = a.step.B, P = a.step.P;
  const int U = a.c.U, ld = a.c.ld, bc = a.c.bc, parts = a.c.ks, GU = G * U;
  const int cl = a.c.cluster;  // cluster mode: its blocks (bc = B, two state buffers)
  // projection (lstm): this block's V rows of W_hr, p0 on; o * tanh(c) rows of ldm values
  const bool proj = C == Cell::Lstm && a.w_hr;
  const int V = proj ? a.c.V : 0, ldm = a.c.ldm;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * V;
  const int Ve = proj ? static_cast<int>(max(int64_t{0}, min(static_cast<int64_t>(V), P - p0))) : 0;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * U;
  const int Ue = static_cast<int>(min(static_cast<int64_t>(U), H - j0)), rows = G * Ue;
  const int AR = max(GU, V);  // products per vector
  Tio* w = reinterpret_cast<Tio*>(smem_raw);  // [rows][ld]: row g*Ue + u is W_hh's g*H + j0 + u
  Tio* wr = w + static_cast<int64_t>(GU) * ld;  // [V][ldm]: row v is W_hr's p0 + v
  Tio* xs = wr + static_cast<int64_t>(V) * ldm;  // [bc][ld] staged state rows ([2][B][ld] cluster)
  const int nbuf = cl ? 2 : 1;
  const int lds = max(ld, ldm);  // (projection: the same rooms hold o * tanh(c) rows)
  float* acc = reinterpret_cast<float*>(xs + static_cast<int64_t>(nbuf) * bc * lds);  // [parts][B][AR]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const Tio* w_hh = static_cast<const Tio*>(a.w_hh);
  for (int lr = warp; lr < rows; lr += nwarps) {
    const Tio* src = w_hh + ((lr / Ue) * H + j0 + lr % Ue) * P;
    for (int k = lane; k < P; k += 32) w[lr * ld + k] = src[k];
  }
  zero_pads(w, rows, static_cast<int>(P), ld);
  if (proj) {
    const Tio* w_hr = static_cast<const Tio*>(a.w_hr);
    for (int v = warp; v < Ve; v += nwarps)
      for (int k = lane; k < H; k += 32) wr[v * ldm + k] = w_hr[(p0 + v) * H + k];
    zero_pads(wr, Ve, static_cast<int>(H), ldm);
  } else {  // (projection: each staging writes its rows' pads)
    zero_pads(xs, nbuf * bc, static_cast<int>(H), ld);
  }

  // Pointwise element e = b * Ue + u (load_points, finish_points).
  const int npts = static_cast<int>(B) * Ue;
  FwdStep f = a.step;
  FwdIn<C> pre[kPrefetch];
  auto load = [&](int e) { return fwd_load<C, Tio>(f, e / Ue, j0 + e % Ue); };

  const int64_t end = steps_end(a.sb);
  place_fwd<Tio>(f, a.sb, a.sb.s0);
  load_points(pre, npts, load);
  for (int64_t s = a.sb.s0; s < end; ++s) {
    const int64_t t = f.t;
    const Tio* hp = static_cast<const Tio*>(f.hprev);
    if (a.ck.k && s % a.ck.k == 0) {  // keep the state entering the step: this block's part
      Tio* kh = static_cast<Tio*>(a.ck.h) + (s / a.ck.k) * B * P;
      float* kc = a.ck.c ? a.ck.c + (s / a.ck.k) * B * H : nullptr;
      const int64_t q0 = proj ? p0 : j0;  // (the state's values: the block's P slice, or units)
      const int nq = proj ? Ve : Ue;
      for (int e = threadIdx.x; e < static_cast<int>(B) * nq; e += blockDim.x) {
        const int64_t b = e / nq, q = q0 + e % nq;
        kh[b * P + q] = hp[b * f.hprev_ld + q];
      }
      for (int e = threadIdx.x; kc && e < npts; e += blockDim.x) {
        const int64_t b = e / Ue, j = j0 + e % Ue;
        kc[b * H + j] = f.cprev[b * f.cprev_ld + j];
      }
    }
    auto skip = [&](int b0, int n) { return none_run(f.lengths, f.mask, t, B, b0, n); };
    const bool vec = vec_ok<Tio>(hp, P, f.hprev_ld);
    // cluster mode: this step's state buffer, and the next step's
    Tio* cur = cl ? xs + ((s - a.sb.s0) & 1) * B * ld : xs;
    Tio* next = cl && s + 1 < end ? xs + ((s - a.sb.s0 + 1) & 1) * B * ld : nullptr;
    for (int b_lo = 0; b_lo < B; b_lo += bc) {
      const int b_hi = static_cast<int>(min(B, static_cast<int64_t>(b_lo) + bc));
      if (!cl || s == a.sb.s0) {  // (cluster: the other blocks wrote the state here)
        for (int b = b_lo + warp; b < b_hi; b += nwarps) {
          if (!cl && !valid_step(f.lengths, f.mask, t, B, b)) continue;  // (cluster: every row, once)
          stage_row<Tio>(cur + (b - b_lo) * ld, hp + b * f.hprev_ld, static_cast<int>(P), ld, vec,
                         lane, proj);
        }
      }
      __syncthreads();
      block_products<Tio>(w, cur, ld, rows, b_lo, b_hi, parts, acc, AR, B * AR, skip);
      __syncthreads();
    }
    finish_points(pre, npts, load, [&](int e, const FwdIn<C>& in) {
      const int b = e / Ue, u = e % Ue;
      float gh[G];
#pragma unroll
      for (int g = 0; g < G; ++g)
        gh[g] = sum_parts(acc + static_cast<int64_t>(b) * AR + g * Ue + u, parts, B * AR);
      const Tio hv = fwd_finish<C, Tio>(f, b, j0 + u, in, gh);
      if (next)  // (cluster: into the buffer every block reads next)
        for (int r = 0; r < cl; ++r) *cluster_map(next + b * ld + j0 + u, r) = hv;
    });
    if constexpr (C == Cell::Lstm) {
      if (proj) {  // h = W_hr (o * tanh c) of the rows that run, once every block wrote its units
        cooperative_groups::this_grid().sync();
        const Tio* m = static_cast<const Tio*>(f.m);
        const bool mvec = vec_ok<Tio>(m, H, H);
        for (int b_lo = 0; b_lo < B; b_lo += bc) {
          const int b_hi = static_cast<int>(min(B, static_cast<int64_t>(b_lo) + bc));
          for (int b = b_lo + warp; b < b_hi; b += nwarps) {
            if (!valid_step(f.lengths, f.mask, t, B, b)) continue;
            const int64_t r = f.prow ? f.prow[t * B + b] : f.row0 + b * f.bstride;  // (m's row: gx's)
            stage_row<Tio>(xs + (b - b_lo) * ldm, m + r * H, static_cast<int>(H), ldm, mvec, lane);
          }
          __syncthreads();
          block_products<Tio>(wr, xs, ldm, Ve, b_lo, b_hi, parts, acc, AR, B * AR, skip);
          __syncthreads();
        }
        // the state's values p0 + v: the product for a row that runs, else the carried state
        for (int e = threadIdx.x; e < static_cast<int>(B) * Ve; e += blockDim.x) {
          const int64_t b = e / Ve, k = p0 + e % Ve;
          const bool valid = valid_step(f.lengths, f.mask, t, B, b);
          const Tio hv = valid ? from_f<Tio>(sum_parts(acc + b * AR + e % Ve, parts, B * AR))
                               : hp[b * f.hprev_ld + k];
          store_state<Tio>(f, b, k, P, valid, hv);
        }
      }
    }
    if (s + 1 < end) {  // (this thread wrote the state and cell its elements read next)
      f = a.step;
      place_fwd<Tio>(f, a.sb, s + 1);
      load_points(pre, npts, load);
    }
    if (cl)
      cluster_barrier();
    else  // (the grid group only in a cooperative launch)
      cooperative_groups::this_grid().sync();
  }
}

// Queues a persistent kernel and returns true, or returns false, queueing
// nothing, when its blocks cannot all be resident at once.
template <typename Params>
bool launch_persistent(void (*kernel)(Params), const PersistentLayout& c, int device,
                       cudaStream_t stream, Params& a) {
  // The shared-memory attribute is per function: hold it until the launch is queued.
  std::lock_guard<std::mutex> lock(persistent_launch_mutex());
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(c.smem)), "cudaFuncSetAttribute");
  if (c.cluster) {
    if (c.cluster > 8)
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
            "cudaFuncSetAttribute");
    if (max_active_clusters(kernel, c.blocks, kPersistentThreads, c.smem) < 1) return false;
    launch_cluster(kernel, c.blocks, kPersistentThreads, c.smem, stream, a);
    return true;
  }
  int per_sm = 0, sms = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistentThreads, c.smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  if (per_sm * sms < c.blocks) return false;  // not all resident (MPS limits, other work)
  launch_cooperative(kernel, c.blocks, kPersistentThreads, c.smem, stream, a);
  return true;
}

// Lays out and queues a persistent kernel (a.c: its layout); false when it
// cannot be resident. A cluster that cannot be resident runs in grid mode.
template <typename Params>
bool launch_persistent(void (*kernel)(Params), const Problem& p, bool backward, cudaStream_t st,
                       Params& a) {
  a.c = persistent_layout(p, backward);
  if (!a.c.ok)
    throw std::invalid_argument(std::string("the persistent ") + (backward ? "backward " : "") +
                                "kernel does not fit this problem");
  if (launch_persistent(kernel, a.c, p.device, st, a)) return true;
  if (!a.c.cluster) return false;
  a.c = layout_for(p, backward, 0);  // no room for the cluster now: grid mode
  return a.c.ok && launch_persistent(kernel, a.c, p.device, st, a);
}

template <Cell C, typename Tio>
bool launch_persistent_fwd(const Problem& p, cudaStream_t st, PersistentParams& a) {
  return launch_persistent(persistent_fwd<C, Tio>, p, false, st, a);
}

struct BwdStep {
  int64_t B, H, P, t, row0, bstride;
  int64_t srow0, sstride;  // row b's saved values (gates, cs) at row srow0 + b * sstride
  const void* dy;  // [N, P] at row r, or null
  float* dh;       // [B, P]: in, gradient w.r.t. the state after the step (dy excluded);
                   // out, the direct part of the gradient w.r.t. the state before it
  float* dc;       // [B, H] lstm, in place
  const float* gates;
  const float* cs;  // lstm: cell after each step, [N, H] at row r
  const float* cprev;
  int64_t cprev_ld;
  const void* hprev;  // gru: state entering the step
  int64_t hprev_ld;
  void* dgx;  // [rows, G*H]: gradient w.r.t. the input-side pre-activations
  void* dgh;  // [rows, G*H]: w.r.t. the recurrent product (gru only; else dgx)
  const int32_t* prow;  // as FwdStep's: dgx and dgh rows are packed, or x's when null
  const int32_t* lengths;
  const uint8_t* mask;
  // Projection, else null: proj_bwd_step writes the gradient w.r.t. each
  // valid step's state to dhr ([rows, P], rows as dgx's); bwd_finish reads
  // the cell's output gradient dm = dhr W_hr ([rows, H], row dslot[b], or b
  // when dslot is null).
  void* dhr;
  const float* dm;
  const int32_t* dslot;
};

// Points a backward step s (processing order, as forward's) at the saved
// state: t, row0, the state entering the step, the LSTM cell before it.
template <typename Tio>
__host__ __device__ __forceinline__ void place_bwd(BwdStep& b, const StateBuffers& sb, int64_t s) {
  const Problem& p = sb.p;
  const int64_t H = p.H, t = p.t_of(s), ss = saved_stride(sb);
  b.t = t;
  b.row0 = p.row0(t);
  b.srow0 = saved_row0(sb, s);
  b.sstride = ss;
  b.hprev = static_cast<const Tio*>(sb.hs) + b.srow0 * p.P;
  b.hprev_ld = ss * p.P;
  if (sb.cs) {
    b.cprev = s == sb.s0 ? sb.c0f : sb.cs + saved_row0(sb, s - 1) * H;
    b.cprev_ld = s == sb.s0 ? H : ss * H;
  }
}

// dy's element (b, k) (width W) where y depends on the state, else 0: y at a
// padded step (lengths) is a constant 0; at a masked step it is the carried
// state, so its gradient flows into that state.
template <typename Tio>
__device__ __forceinline__ float dy_term(const BwdStep& s, int64_t b, int64_t k, int64_t W,
                                         bool valid) {
  const int64_t r = s.row0 + b * s.bstride;
  const bool dy_counts = s.dy && (valid || !s.lengths);
  return dy_counts ? to_f(static_cast<const Tio*>(s.dy)[r * W + k]) : 0.f;
}

// dh[b, k] plus dy's element (b, k) (width W), as dy_term says.
template <typename Tio>
__device__ __forceinline__ float dh_with_dy(const BwdStep& s, int64_t b, int64_t k, int64_t W,
                                            bool valid) {
  return s.dh[b * W + k] + dy_term<Tio>(s, b, k, W, valid);
}

// What a backward step reads for element (b, j) besides dh, which the
// recurrent product of the step processed before completes: whether the
// step is valid, dy's term, and for a valid step the saved gates (lstm: the
// cells before and after it and dc; gru: the state entering it). The
// persistent kernel loads them for the next step before the grid barrier.
struct BwdIn {
  bool valid;
  float dy;
  float q[4];
  float c_prev, c, dc, h;
  int64_t gr;  // the row of dgx (and dgh)
};

template <Cell C, typename Tio>
__device__ __forceinline__ BwdIn bwd_load(const BwdStep& s, int64_t b, int64_t j) {
  const int64_t H = s.H;
  BwdIn in{};
  in.valid = valid_step(s.lengths, s.mask, s.t, s.B, b);
  // (with projection the state's gradient, dy included, is proj_bwd_step's)
  const bool proj = C == Cell::Lstm && s.dm;
  in.dy = proj ? 0.f : dy_term<Tio>(s, b, j, H, in.valid);
  if (!in.valid) return in;
  in.gr = s.prow ? s.prow[s.t * s.B + b] : s.row0 + b * s.bstride;
  const int64_t sr = s.srow0 + b * s.sstride;
  if constexpr (C == Cell::Lstm || C == Cell::Gru) {
    const float* gs = s.gates + sr * 4 * H + j;
#pragma unroll
    for (int g = 0; g < 4; ++g) in.q[g] = gs[g * H];
  } else {
    in.q[0] = s.gates[sr * H + j];
  }
  if constexpr (C == Cell::Lstm) {
    in.c_prev = s.cprev[b * s.cprev_ld + j];
    in.c = s.cs[sr * H + j];
    in.dc = s.dc[b * H + j];
  }
  if constexpr (C == Cell::Gru) in.h = to_f(static_cast<const Tio*>(s.hprev)[b * s.hprev_ld + j]);
  return in;
}

// The rest of a backward step for element (b, j), given bwd_load's values.
// For a valid step, rec[g] receives what the recurrent product reads (dgh
// for gru, else dgx), as stored. With projection, dmv (the persistent
// kernel's) is the cell output's gradient, else s.dm's element is.
template <Cell C, typename Tio>
__device__ __forceinline__ void bwd_finish(const BwdStep& s, int64_t b, int64_t j, const BwdIn& in,
                                           Tio (&rec)[4], const float* dmv = nullptr) {
  const int64_t H = s.H, i = b * H + j;
  constexpr int G = kGates<C>;
  const int64_t GH = G * H;
  const bool proj = C == Cell::Lstm && s.dm;
  float dh;
  if (proj) {  // the state's gradient is proj_bwd_step's; this is the cell output's
    if (!in.valid) return;  // dc carries
    dh = dmv ? *dmv : s.dm[(s.dslot ? s.dslot[b] : b) * H + j];
  } else {
    dh = s.dh[i] + in.dy;
    if (!in.valid) {  // no dgates row: invalid steps exist only with packed rows (prow)
      s.dh[i] = dh;
      return;
    }
  }
  Tio* dgx = static_cast<Tio*>(s.dgx) + in.gr * GH + j;
  Tio* dgh = C == Cell::Gru ? static_cast<Tio*>(s.dgh) + in.gr * GH + j : nullptr;
  if constexpr (C == Cell::Lstm) {
    using L = cell::Lstm<DevMath>;
    const L::Gates q{in.q[0], in.q[1], in.q[2], in.q[3]};
    L::Gates d;
    const float dcp = L::backward(q, in.c_prev, in.c, dh, in.dc, &d);
    rec[0] = from_f<Tio>(d.i); rec[1] = from_f<Tio>(d.f);
    rec[2] = from_f<Tio>(d.g); rec[3] = from_f<Tio>(d.o);
#pragma unroll
    for (int g = 0; g < 4; ++g) dgx[g * H] = rec[g];
    s.dc[i] = dcp;
    if (!proj) s.dh[i] = 0.f;
  } else if constexpr (C == Cell::Gru) {
    using R = cell::Gru<DevMath>;
    const R::Gates q{in.q[0], in.q[1], in.q[2]};
    R::Gates dx, dhh;
    const float direct = R::backward(q, in.q[3], in.h, dh, &dx, &dhh);
    dgx[0] = from_f<Tio>(dx.r); dgx[H] = from_f<Tio>(dx.z); dgx[2 * H] = from_f<Tio>(dx.n);
    rec[0] = from_f<Tio>(dhh.r); rec[1] = from_f<Tio>(dhh.z); rec[2] = from_f<Tio>(dhh.n);
#pragma unroll
    for (int g = 0; g < 3; ++g) dgh[g * H] = rec[g];
    s.dh[i] = direct;
  } else {
    rec[0] = from_f<Tio>(cell::Rnn<C, DevMath>::backward(dh, in.q[0]));
    dgx[0] = rec[0];
    s.dh[i] = 0.f;
  }
}

template <Cell C, typename Tio>
__global__ void bwd_step(BwdStep s) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= s.B * s.H) return;
  const int64_t b = i / s.H, j = i % s.H;
  Tio rec[4];
  bwd_finish<C, Tio>(s, b, j, bwd_load<C, Tio>(s, b, j), rec);
}

// The state's gradient of a projected LSTM step, element (b, k), k < P: dh
// plus dy; for a valid row it goes to dhr (the input of dm = dhr W_hr and of
// dW_hr) and dh restarts from 0, for another row it carries.
template <typename Tio>
__global__ void proj_bwd_step(BwdStep s) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= s.B * s.P) return;
  const int64_t P = s.P, b = i / P, k = i % P;
  const bool valid = valid_step(s.lengths, s.mask, s.t, s.B, b);
  const int64_t r = s.row0 + b * s.bstride;
  float d = dh_with_dy<Tio>(s, b, k, P, valid);
  if (valid) {
    static_cast<Tio*>(s.dhr)[(s.prow ? s.prow[s.t * s.B + b] : r) * P + k] = from_f<Tio>(d);
    d = 0.f;
  }
  s.dh[i] = d;
}

// ------------------------------------------------ persistent backward
//
// Block k owns hidden units [k*U, k*U + U) as in the forward kernel, but
// keeps the transposed slice: the columns of W_hh for its units, all G*H
// rows, stored [U][G*H] (padded as the forward's rows). Per step (reverse
// order): first the recurrent gradient for its units, dh[b, j] += sum over
// rows of dgates[b, row] * W_hh[row, j] (the dgates of the step processed
// before, staged from global memory, block_products with K = G*H); then the
// pointwise gradient of its units, which writes their dgates; then the
// grid-wide barrier. One last recurrent product after the loop gives dh0.
// dh, dc, dgates and the deferred products are exactly the standard
// algorithm's.

struct PersistentBwdParams {
  BwdStep step;  // the per-step fields are set by place_bwd in the kernel
  StateBuffers sb;
  const void* w_hh;
  bool dh0;  // whether dh0 is wanted: the last recurrent product gives only that
  PersistentLayout c;  // (set at launch)
  const void* w_hr = nullptr;  // projection: [P, H] (step.dhr: the state's gradients)
};

// With projection (lstm, grid mode), a step has two phases, each ending at a
// grid-wide barrier. First the block owns V of the state's P values: dh for
// them gets the recurrent product (W_hh's columns for them, K = G*H), then,
// with dy, goes to dhr for a valid row (as proj_bwd_step). Then it owns its
// units: it stages the valid rows' dhr, multiplies them by W_hr's columns for
// its units (K = P), which gives the cell output's gradient dm, and runs the
// cell's pointwise gradient.
template <Cell C, typename Tio>
__global__ void __launch_bounds__(kPersistentThreads, 1) persistent_bwd(PersistentBwdParams a) {
  constexpr int G = kGates<C>;
  FUSEDRNN_SHARED_BYTES(smem_raw);
  const int64_t H = a.step.H, B = a.step.B, GH = G * H, P = a.step.P;
  const int U = a.c.U, ld = a.c.ld, bc = a.c.bc, parts = a.c.ks;
  const int cl = a.c.cluster;  // cluster mode: its blocks (bc = B, two dgates buffers)
  const bool proj = C == Cell::Lstm && a.w_hr;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * U;
  const int Ue = static_cast<int>(min(static_cast<int64_t>(U), H - j0));
  // The columns of W_hh this block multiplies: its units', or with projection
  // its V state values' (from c0 on, nc of them).
  const int NC = proj ? a.c.V : U, ldm = a.c.ldm;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * NC;
  const int nc = static_cast<int>(max(int64_t{0}, min(static_cast<int64_t>(NC), P - c0)));
  const int AR = proj ? max(NC, U) : U;  // products per vector
  Tio* wt = reinterpret_cast<Tio*>(smem_raw);  // [NC][ld]: row u is W_hh's column c0 + u
  Tio* wr = wt + static_cast<int64_t>(NC) * ld;  // projection: [U][ldm], row u is W_hr's column j0 + u
  Tio* xs = wr + (proj ? static_cast<int64_t>(U) * ldm : 0);  // [bc][ld] staged rows ([2][B][ld] cluster)
  const int nbuf = cl ? 2 : 1;
  const int lds = max(ld, ldm);
  float* acc = reinterpret_cast<float*>(xs + static_cast<int64_t>(nbuf) * bc * lds);  // [parts][B][AR]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int npts = static_cast<int>(B) * Ue, ncpts = static_cast<int>(B) * nc;
  const Tio* w_hh = static_cast<const Tio*>(a.w_hh);
  for (int64_t e = threadIdx.x; e < GH * nc; e += blockDim.x) {  // (along the columns: coalesced)
    const int64_t row = e / nc, u = e % nc;
    wt[u * ld + row] = w_hh[row * P + c0 + u];
  }
  zero_pads(wt, nc, static_cast<int>(GH), ld);
  if (proj) {
    const Tio* w_hr = static_cast<const Tio*>(a.w_hr);
    for (int64_t e = threadIdx.x; e < P * Ue; e += blockDim.x) {
      const int64_t k = e / Ue, u = e % Ue;
      wr[u * ldm + k] = w_hr[k * H + j0 + u];
    }
    zero_pads(wr, Ue, static_cast<int>(P), ldm);
  } else {  // (projection: each staging writes its rows' pads)
    zero_pads(xs, nbuf * bc, static_cast<int>(GH), ld);
  }
  const Tio* dgh = static_cast<const Tio*>(C == Cell::Gru ? a.step.dgh : a.step.dgx);
  const Problem& p = a.sb.p;
  auto row_of = [&](int64_t t, int64_t b) {  // (t, b)'s row of dgx, dgh and dhr
    return a.step.prow ? a.step.prow[t * B + b] : p.row0(t) + b * p.bstride();
  };
  // dh[b, c0 + u] += the product of step t's dgates with the block's columns,
  // for the rows that ran at t (the others have no dgates). Cluster mode:
  // the blocks wrote step t's dgates into buffer `buf` of every block.
  auto recurrent = [&](int64_t t, const Tio* buf) {
    auto runs = [&](int64_t b) { return valid_step(a.step.lengths, a.step.mask, t, B, b); };
    auto skip = [&](int b0, int n) { return none_run(a.step.lengths, a.step.mask, t, B, b0, n); };
    const bool vec = vec_ok<Tio>(dgh, GH, GH);
    for (int b_lo = 0; b_lo < B; b_lo += bc) {
      const int b_hi = static_cast<int>(min(B, static_cast<int64_t>(b_lo) + bc));
      for (int b = b_lo + warp; b < b_hi && !cl; b += nwarps) {
        if (!runs(b)) continue;
        stage_row<Tio>(xs + (b - b_lo) * ld, dgh + row_of(t, b) * GH, static_cast<int>(GH), ld,
                       vec, lane, proj);
      }
      __syncthreads();
      block_products<Tio>(wt, cl ? buf : xs, ld, nc, b_lo, b_hi, parts, acc, AR, B * AR, skip);
      __syncthreads();
    }
    for (int e = threadIdx.x; e < ncpts; e += blockDim.x) {  // (the thread of element e)
      const int b = e / nc, u = e % nc;
      if (runs(b))
        a.step.dh[b * P + c0 + u] += sum_parts(acc + static_cast<int64_t>(b) * AR + u, parts, B * AR);
    }
  };
  // Pointwise element e = b * Ue + u (load_points, finish_points; without
  // projection recurrent adds to its dh on the same thread).
  BwdStep f = a.step;
  BwdIn pre[kPrefetch];
  auto load = [&](int e) { return bwd_load<C, Tio>(f, e / Ue, j0 + e % Ue); };
  int64_t t_done = -1;  // the step whose dgates the next recurrent product reads
  if (steps_end(a.sb) > a.sb.s0) {
    place_bwd<Tio>(f, a.sb, steps_end(a.sb) - 1);
    load_points(pre, npts, load);
  }
  // cluster mode: step s writes its dgates to buffer (end - 1 - s) & 1
  auto buffer = [&](int64_t s) { return cl ? xs + ((steps_end(a.sb) - 1 - s) & 1) * B * ld : xs; };
  for (int64_t s = steps_end(a.sb) - 1; s >= a.sb.s0; --s) {
    if (t_done >= 0) recurrent(t_done, buffer(s + 1));
    if constexpr (C == Cell::Lstm) {
      if (proj) {
        // the state's gradient with dy: dhr for a valid row (dh restarts from 0), else dh carries
        Tio* dhr = static_cast<Tio*>(f.dhr);
        for (int e = threadIdx.x; e < ncpts; e += blockDim.x) {
          const int64_t b = e / nc, k = c0 + e % nc;
          const bool valid = valid_step(f.lengths, f.mask, f.t, B, b);
          float d = dh_with_dy<Tio>(f, b, k, P, valid);
          if (valid) {
            dhr[row_of(f.t, b) * P + k] = from_f<Tio>(d);
            d = 0.f;
          }
          f.dh[b * P + k] = d;
        }
        cooperative_groups::this_grid().sync();
        // dm = dhr W_hr for the block's units, over the rows that run
        auto skip = [&](int b0, int n) { return none_run(f.lengths, f.mask, f.t, B, b0, n); };
        const bool vec = vec_ok<Tio>(dhr, P, P);
        for (int b_lo = 0; b_lo < B; b_lo += bc) {
          const int b_hi = static_cast<int>(min(B, static_cast<int64_t>(b_lo) + bc));
          for (int b = b_lo + warp; b < b_hi; b += nwarps) {
            if (!valid_step(f.lengths, f.mask, f.t, B, b)) continue;
            stage_row<Tio>(xs + (b - b_lo) * ldm, dhr + row_of(f.t, b) * P, static_cast<int>(P),
                           ldm, vec, lane);
          }
          __syncthreads();
          block_products<Tio>(wr, xs, ldm, Ue, b_lo, b_hi, parts, acc, AR, B * AR, skip);
          __syncthreads();
        }
      }
    }
    __syncthreads();
    finish_points(pre, npts, load, [&](int e, const BwdIn& in) {
      const int64_t b = e / Ue, j = j0 + e % Ue;
      Tio rec[4];
      if (proj) {
        const float dm = sum_parts(acc + b * AR + e % Ue, parts, B * AR);
        bwd_finish<C, Tio>(f, b, j, in, rec, &dm);
      } else {
        bwd_finish<C, Tio>(f, b, j, in, rec);
      }
      if (cl && in.valid) {  // (cluster: its dgates into every block's buffer)
        Tio* dst = buffer(s) + b * ld + j;
        for (int r = 0; r < cl; ++r) {
          Tio* d = cluster_map(dst, r);
#pragma unroll
          for (int g = 0; g < G; ++g) d[g * H] = rec[g];
        }
      }
    });
    t_done = f.t;
    if (s > a.sb.s0) {  // (this thread wrote the dc its elements read next)
      f = a.step;
      place_bwd<Tio>(f, a.sb, s - 1);
      load_points(pre, npts, load);
    }
    if (cl)
      cluster_barrier();
    else  // (the grid group only in a cooperative launch)
      cooperative_groups::this_grid().sync();
  }
  // The last step's product: only dh0 at step 0, else the next segment's dh.
  if (t_done >= 0 && (a.dh0 || a.sb.s0 > 0)) recurrent(t_done, buffer(a.sb.s0));
}

PersistentLayout persistent_bwd_config(const Problem& p) { return persistent_layout(p, true); }

template <Cell C, typename Tio>
bool launch_persistent_bwd(const Problem& p, cudaStream_t st, PersistentBwdParams& a) {
  return launch_persistent(persistent_bwd<C, Tio>, p, true, st, a);
}

// Which rows run at each step: the valid ones (DESIGN.md §2), every row
// without lengths or mask. When some step is not valid, the valid steps are
// numbered in one packed order, step by step (t ascending) and in batch order
// within a step: (t, b) is packed row prow[t * B + b] = offset[t] + slot[t * B
// + b], -1 when it does not run. The input projection, the gate gradients
// and the deferred weight-gradient products then cover those rows only, and
// step t's rows are the contiguous block [offset[t], offset[t] + count[t]).
// A step whose running rows are a prefix of the batch (every step with
// lengths sorted longest first, as PyTorch's packed sequences) multiplies
// them in place; other steps gather them for their recurrent product
// (forward) and scatter its result (backward). So no product includes a
// step that is not valid (lengths [2, 7, 5]: at t = 3 rows 1 and 2 run).
struct RunningRows {
  int64_t T, B;
  bool packed = false;  // some step is not valid: rows are packed
  int64_t valid = 0;    // rows that run (the packed rows)
  std::vector<int64_t> offset, count;
  std::vector<char> is_prefix;
  // One host block, uploaded as one: rows [valid] (packed row -> batch row),
  // xrows [valid] (packed row -> x's row), slot [T*B], prow [T*B].
  std::vector<int32_t> host;
  const int32_t *d_rows = nullptr, *d_xrows = nullptr, *d_slot = nullptr, *d_prow = nullptr;

  // pack_all: pack the rows even when every step is valid (checkpointed caches).
  RunningRows(const Problem& p, const std::vector<int32_t>& lengths,
              const std::vector<uint8_t>& mask, bool pack_all = false)
      : T(p.T), B(p.B) {
    valid = valid_steps(p, lengths, mask);
    packed = valid < T * B || (pack_all && T * B > 0);
    if (!packed) return;
    if (T * B > INT32_MAX)  // the row indices below are int32, as cuBLAS's dimensions
      throw std::invalid_argument("T * B = " + std::to_string(T * B) +
                                  " rows exceed the CUDA backend's limit of 2^31 - 1");
    auto runs = [&](int64_t t, int64_t b) {
      if (!lengths.empty()) return t < lengths[b];
      return mask.empty() || mask[t * B + b] != 0;
    };
    offset.assign(T, 0);
    count.assign(T, 0);
    is_prefix.assign(T, 1);
    host.assign(2 * valid + 2 * T * B, -1);
    int32_t *rows = host.data(), *xrows = rows + valid, *slot = xrows + valid, *prow = slot + T * B;
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      offset[t] = n;
      for (int64_t b = 0; b < B; ++b) {
        if (!runs(t, b)) continue;
        is_prefix[t] = is_prefix[t] && b == n - offset[t];
        slot[t * B + b] = static_cast<int32_t>(n - offset[t]);
        prow[t * B + b] = static_cast<int32_t>(n);
        rows[n] = static_cast<int32_t>(b);
        xrows[n] = static_cast<int32_t>(p.row0(t) + b * p.bstride());
        ++n;
      }
      count[t] = n - offset[t];
    }
  }
  // Rows of step t's recurrent product; whether they are rows [0, n(t)) of the batch.
  int64_t n(int64_t t) const { return packed ? count[t] : B; }
  bool prefix(int64_t t) const { return !packed || is_prefix[t]; }
  void upload(Scratch& scratch, cudaStream_t st) {
    if (!packed) return;
    int32_t* d = scratch.alloc<int32_t>(static_cast<int64_t>(host.size()));
    check(cudaMemcpyAsync(d, host.data(), host.size() * sizeof(int32_t), cudaMemcpyHostToDevice,
                          st), "cudaMemcpyAsync");
    d_rows = d;
    d_xrows = d + valid;
    d_slot = d + 2 * valid;
    d_prow = d + 2 * valid + T * B;
  }
};

// ---------------------------------------------------------------- drivers

// The default memory pool returns freed memory to the driver at every
// synchronisation unless told otherwise; scratch and caches are allocated
// every call, so keep it (as PyTorch's caching allocator does). Once per device.
void keep_pool_memory(int device) {
  static std::mutex m;
  static std::vector<int> done;
  std::lock_guard<std::mutex> lock(m);
  if (std::find(done.begin(), done.end(), device) != done.end()) return;
  done.push_back(device);
  cudaMemPool_t pool;
  if (cudaDeviceGetDefaultMemPool(&pool, device) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  uint64_t threshold = UINT64_MAX;
  if (cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold) != cudaSuccess)
    cudaGetLastError();
}

// The standard algorithm's steps [s0, s1), shared by forward and a
// checkpointed backward's recomputation: per step the recurrent product of
// the running rows, the pointwise kernel and, with projection, h = m W_hr^T
// and its kernel. With ck, the state entering every k-th step is kept first.
// packed: B*P scratch for the running rows of h when some step gathers them.
template <Cell C, typename Tio>
void forward_steps(const Problem& p, const RunningRows& run, const FwdStep& base,
                   const StateBuffers& sb, int64_t s0, int64_t s1, const void* w_hh,
                   const void* w_hr, Tio* packed, const Checkpoints* ck) {
  const int64_t B = p.B, H = p.H, P = p.P, GH = p.G() * H, bs = p.bstride();
  const blas::Type bt = BlasType<Tio>::v;
  cudaStream_t st = p.stream;
  const int dev = p.device;
  const Tio* m = static_cast<const Tio*>(base.m);
  for (int64_t s = s0; s < s1; ++s) {
    FwdStep f = base;
    place_fwd<Tio>(f, sb, s);
    if (ck && s % ck->k == 0) {  // (the ping-pong buffers: rows of P, and of H for c)
      const int64_t j = s / ck->k;
      check(cudaMemcpyAsync(static_cast<Tio*>(ck->h) + j * B * P, f.hprev, B * P * sizeof(Tio),
                            cudaMemcpyDeviceToDevice, st), "cudaMemcpyAsync");
      if (ck->c)
        check(cudaMemcpyAsync(ck->c + j * B * H, f.cprev, B * H * sizeof(float),
                              cudaMemcpyDeviceToDevice, st), "cudaMemcpyAsync");
    }
    const int64_t n = run.n(f.t);
    if (run.prefix(f.t)) {
      gemm(st, dev, blas::T, blas::N, GH, n, P, 1.f, w_hh, bt, P, f.hprev, bt, f.hprev_ld, 0.f,
           const_cast<float*>(f.gh), blas::R32F, GH);
    } else if (n > 0) {
      FUSEDRNN_LAUNCH(blocks_for(n * P), kThreads, 0, st, gather_rows<Tio>)(
          packed, static_cast<const Tio*>(f.hprev), f.hprev_ld, run.d_rows + run.offset[f.t], n, P);
      gemm(st, dev, blas::T, blas::N, GH, n, P, 1.f, w_hh, bt, P, packed, bt, P, 0.f,
           const_cast<float*>(f.gh), blas::R32F, GH);
      f.ghslot = run.d_slot + f.t * B;
    }
    FUSEDRNN_LAUNCH(blocks_for(B * H), kThreads, 0, st, fwd_step<C, Tio>)(f);
    if (m) {  // h' = m W_hr^T over the running rows (in the rows' slots, as gh)
      if (n > 0) {
        const Tio* m_t = run.packed ? m + run.offset[f.t] * H : m + f.row0 * H;
        gemm(st, dev, blas::T, blas::N, P, n, H, 1.f, w_hr, bt, H, m_t, bt,
             run.packed ? H : bs * H, 0.f, const_cast<float*>(f.hproj), blas::R32F, P);
      }
      FUSEDRNN_LAUNCH(blocks_for(B * P), kThreads, 0, st, proj_fwd_step<Tio>)(f);
    }
  }
}

template <Cell C, typename Tio>
void forward_impl(const Problem& p, const ForwardIn& in, void* y, void* h_n, void* c_n,
                  Cache* cache, Algo algo, bool required) {
  DeviceGuard guard(p.device);
  keep_pool_memory(p.device);
  const int64_t T = p.T, B = p.B, I = p.I, H = p.H, P = p.P, G = p.G(), GH = G * H, N = p.N();
  const int64_t bs = p.bstride();
  const blas::Type bt = BlasType<Tio>::v;
  cudaStream_t st = p.stream;
  const int dev = p.device;
  constexpr bool lstm = C == Cell::Lstm;
  const bool proj = lstm && p.proj;
  if (B == 0) return;
  if (T == 0) {  // h_n = h0, c_n = c0
    FUSEDRNN_LAUNCH(blocks_for(B * P), kThreads, 0, st, set_rows<Tio>)(static_cast<Tio*>(h_n), P,
                                                          static_cast<const Tio*>(in.h0), B, P);
    if (lstm)
      FUSEDRNN_LAUNCH(blocks_for(B * H), kThreads, 0, st, set_rows<Tio>)(static_cast<Tio*>(c_n), H,
                                                            static_cast<const Tio*>(in.c0), B, H);
    check(cudaGetLastError(), "fusedrnn forward");
    return;
  }
  // A checkpointed cache keeps the state every k steps only: the steps run
  // as in inference, and every row is packed (see backward_impl).
  const int64_t k = cache ? cache->ck : 0;
  const bool full = cache && k == 0;  // the cache keeps every step's values
  Scratch scratch(st);
  RunningRows run(p, in.lengths, in.mask, k > 0);
  run.upload(scratch, st);
  const int64_t R = run.packed ? run.valid : N;  // rows of the input projection
  float* gx = scratch.alloc<float>(R * GH);
  float* gh = scratch.alloc<float>(B * GH);
  // projection: each valid step's o * tanh(c) (rows as gx's; a full cache
  // keeps them for dW_hr) and a step's product m W_hr^T
  Tio* m = nullptr;
  float* hproj = proj ? scratch.alloc<float>(B * P) : nullptr;
  const int32_t* d_len = nullptr;
  const uint8_t* d_mask = nullptr;
  Tio* hs = nullptr;  // full cache: state entering each step, x's row order
  float* cs = nullptr;
  float* gates = nullptr;
  float* c0f = nullptr;
  Tio* hbuf[2] = {nullptr, nullptr};
  float* cbuf[2] = {nullptr, nullptr};
  const void* x = in.x;  // the input projection's rows
  const void* w_hh = in.w_hh;
  if (run.packed) {  // the valid rows of x (into the cache, which keeps them for dW_ih)
    if (cache && cache->x_rows != R) throw std::logic_error("fusedrnn: cache made for other rows");
    Tio* xp = cache ? cache->at<Tio>(cache->x_off) : scratch.alloc<Tio>(R * I);
    if (R > 0)
      FUSEDRNN_LAUNCH(blocks_for(R * I), kThreads, 0, st, gather_rows<Tio>)(
          xp, static_cast<const Tio*>(in.x), I, run.d_xrows, R, I);
    x = xp;
  }
  if (cache) {
    const std::size_t es = sizeof(Tio);
    auto keep = [&](std::size_t off, const void* src, int64_t n) {
      if (src && n > 0)
        check(cudaMemcpyAsync(cache->mem + off, src, n * es, cudaMemcpyDeviceToDevice, st),
              "cudaMemcpyAsync");
    };
    if (!run.packed) keep(cache->x_off, in.x, N * I);
    keep(cache->wih_off, in.w_ih, GH * I);
    keep(cache->whh_off, in.w_hh, GH * P);
    if (proj) keep(cache->whr_off, in.w_hr, P * H);
    if (k) {  // the recomputation needs the biases too
      keep(cache->bih_off, in.b_ih, GH);
      keep(cache->bhh_off, in.b_hh, GH);
    }
    if (full) {
      hs = cache->at<Tio>(cache->hprev_off);
      gates = cache->at<float>(cache->gates_off);
      if (proj) m = cache->at<Tio>(cache->m_off);
      if (lstm) {
        cs = cache->at<float>(cache->cs_off);
        c0f = cache->at<float>(cache->c0_off);
      }
    }
    if (!in.lengths.empty()) d_len = cache->at<int32_t>(cache->len_off);
    if (!in.mask.empty()) d_mask = cache->at<uint8_t>(cache->mask_off);
    cache->algo = Algo::Standard;
  } else {
    if (!in.lengths.empty()) d_len = scratch.alloc<int32_t>(B);
    if (!in.mask.empty()) d_mask = scratch.alloc<uint8_t>(T * B);
  }
  if (!full) {
    hbuf[0] = scratch.alloc<Tio>(B * P);
    hbuf[1] = scratch.alloc<Tio>(B * P);
    if (proj) m = scratch.alloc<Tio>(R * H);
    if (lstm) {
      cbuf[0] = c0f = scratch.alloc<float>(B * H);
      cbuf[1] = scratch.alloc<float>(B * H);
    }
  }
  if (d_len)
    check(cudaMemcpyAsync(const_cast<int32_t*>(d_len), in.lengths.data(), B * sizeof(int32_t),
                          cudaMemcpyHostToDevice, st), "cudaMemcpyAsync");
  if (d_mask)
    check(cudaMemcpyAsync(const_cast<uint8_t*>(d_mask), in.mask.data(), T * B,
                          cudaMemcpyHostToDevice, st), "cudaMemcpyAsync");

  // Input projection of every row that runs: gx = x W_ih^T.
  gemm(st, dev, blas::T, blas::N, GH, R, I, 1.f, in.w_ih, bt, I, x, bt, I, 0.f, gx, blas::R32F, GH);
  // The step's fields that do not change between steps, and the state buffers.
  FwdStep base{};
  base.B = B; base.H = H; base.P = P; base.bstride = bs; base.gx = gx; base.prow = run.d_prow;
  base.gh = gh; base.b_ih = in.b_ih; base.b_hh = in.b_hh; base.gates = gates; base.y = y;
  base.lengths = d_len; base.mask = d_mask; base.m = m; base.hproj = hproj;
  const StateBuffers sb{p, hs, hbuf[0], hbuf[1], cs, cbuf[0], cbuf[1], c0f, h_n,
                        lstm ? c_n : nullptr};
  // The initial state, where the first step reads it (c0 in float32).
  FwdStep first = base;
  place_fwd<Tio>(first, sb, 0);
  FUSEDRNN_LAUNCH(blocks_for(B * P), kThreads, 0, st, set_rows<Tio>)(
      static_cast<Tio*>(const_cast<void*>(first.hprev)), first.hprev_ld,
      static_cast<const Tio*>(in.h0), B, P);
  if (lstm)
    FUSEDRNN_LAUNCH(blocks_for(B * H), kThreads, 0, st, to_float<Tio>)(
        static_cast<const Tio*>(in.c0), c0f, B * H);

  Checkpoints ck;
  if (k) {
    ck.k = k;
    ck.h = cache->at<Tio>(cache->ckh_off);
    ck.c = lstm ? cache->at<float>(cache->ckc_off) : nullptr;
  }
  if (algo == Algo::Persistent) {
    PersistentParams a{base, sb, w_hh, ck, {}};
    a.step.gh = nullptr;  // the products stay in shared memory
    a.w_hr = proj ? in.w_hr : nullptr;
    if (launch_persistent_fwd<C, Tio>(p, st, a)) {
      if (cache) {
        cache->algo = Algo::Persistent;
        cache->fwd_cluster = a.c.cluster > 0;  // (a checkpointed backward recomputes so)
      }
      check(cudaGetLastError(), "fusedrnn forward (persistent)");
      return;
    }
    if (required)
      throw std::invalid_argument("algo 'persistent': its blocks cannot all be resident on this "
                                  "device at once (other work or MPS limits)");
    // auto: the standard loop below (the state buffers are the same)
  }
  Tio* packed = run.packed ? scratch.alloc<Tio>(B * P) : nullptr;  // a step's running rows of h
  forward_steps<C, Tio>(p, run, base, sb, 0, T, w_hh, in.w_hr, packed, k ? &ck : nullptr);
  check(cudaGetLastError(), "fusedrnn forward");
}

template <Cell C, typename Tio>
void backward_impl(const Cache& c, cudaStream_t st, const void* dy, const void* dh_n,
                   const void* dc_n, const Grads& g, Algo algo, int cluster) {
  const Problem& p = c.p;
  // the backward steps' persistent kernel (cluster: its mode), and a
  // checkpointed recomputation's, which runs as forward did
  Problem pb = p, pf = p;
  pb.cluster = cluster;
  pf.cluster = c.fwd_cluster;
  DeviceGuard guard(p.device);
  const int64_t T = p.T, B = p.B, I = p.I, H = p.H, P = p.P, G = p.G(), GH = G * H, N = p.N();
  const int64_t bs = p.bstride();
  const blas::Type bt = BlasType<Tio>::v;
  const int dev = p.device;
  constexpr bool lstm = C == Cell::Lstm;
  const bool proj = lstm && p.proj;
  const int64_t k = c.ck;
  const std::size_t es = sizeof(Tio);
  c.use_on(st);
  Scratch scratch(st);
  auto zero_weight_grads = [&] {
    check(cudaMemsetAsync(g.w_ih, 0, GH * I * es, st), "cudaMemsetAsync");
    check(cudaMemsetAsync(g.w_hh, 0, GH * P * es, st), "cudaMemsetAsync");
    check(cudaMemsetAsync(g.b_ih, 0, GH * es, st), "cudaMemsetAsync");
    check(cudaMemsetAsync(g.b_hh, 0, GH * es, st), "cudaMemsetAsync");
    if (proj) check(cudaMemsetAsync(g.w_hr, 0, P * H * es, st), "cudaMemsetAsync");
  };
  if (N == 0) {  // nothing ran: the state gradients pass through, the rest is 0
    if (B && g.h0)
      FUSEDRNN_LAUNCH(blocks_for(B * P), kThreads, 0, st, set_rows<Tio>)(static_cast<Tio*>(g.h0), P,
                                                            static_cast<const Tio*>(dh_n), B, P);
    if (B && lstm && g.c0)
      FUSEDRNN_LAUNCH(blocks_for(B * H), kThreads, 0, st, set_rows<Tio>)(static_cast<Tio*>(g.c0), H,
                                                            static_cast<const Tio*>(dc_n), B, H);
    zero_weight_grads();
    check(cudaGetLastError(), "fusedrnn backward");
    return;
  }
  RunningRows run(p, c.lengths, c.mask, k > 0);
  run.upload(scratch, st);
  const int64_t R = run.packed ? run.valid : N;  // rows of dgates, as forward's input projection
  if (c.x_rows != R) throw std::logic_error("fusedrnn: cache made for other rows");
  Tio* dgx = scratch.alloc<Tio>(R * GH);
  Tio* dgh = C == Cell::Gru ? scratch.alloc<Tio>(R * GH) : dgx;
  float* dh = scratch.alloc<float>(B * P);
  float* dc = lstm ? scratch.alloc<float>(B * H) : nullptr;
  // projection: each valid step's state gradient (rows as dgx's) and a step's dhr W_hr
  Tio* dhr = proj ? scratch.alloc<Tio>(R * P) : nullptr;
  float* dm = proj ? scratch.alloc<float>(B * H) : nullptr;
  FUSEDRNN_LAUNCH(blocks_for(B * P), kThreads, 0, st, to_float<Tio>)(static_cast<const Tio*>(dh_n), dh, B * P);
  if (lstm)
    FUSEDRNN_LAUNCH(blocks_for(B * H), kThreads, 0, st, to_float<Tio>)(static_cast<const Tio*>(dc_n), dc, B * H);
  const Tio* xc = c.at<Tio>(c.x_off);
  const Tio* wih = c.at<Tio>(c.wih_off);
  const Tio* whh = c.at<Tio>(c.whh_off);
  const Tio* whr = proj ? c.at<Tio>(c.whr_off) : nullptr;
  const int32_t* d_len = c.lengths.empty() ? nullptr : c.at<int32_t>(c.len_off);
  const uint8_t* d_mask = c.mask.empty() ? nullptr : c.at<uint8_t>(c.mask_off);

  BwdStep base{};
  base.B = B; base.H = H; base.P = P; base.bstride = bs; base.dy = dy; base.dh = dh; base.dc = dc;
  base.dgx = dgx; base.dgh = dgh;
  base.prow = run.d_prow; base.lengths = d_len; base.mask = d_mask; base.dhr = dhr;
  base.dm = dm;  // (with projection non-null: bwd_load and bwd_finish take the cell output's path)

  // Steps s = s_hi down to s_lo, with the saved values of sb (its gates and cell).
  float* dh_packed = run.packed ? scratch.alloc<float>(B * P) : nullptr;
  auto backward_steps = [&](const StateBuffers& sb, const float* gates, int64_t s_hi,
                            int64_t s_lo) {
    BwdStep bb = base;
    bb.gates = gates;
    bb.cs = sb.cs;
    for (int64_t s = s_hi; s >= s_lo; --s) {
      BwdStep b = bb;
      place_bwd<Tio>(b, sb, s);
      const int64_t n = run.n(b.t);
      if (proj) {  // the state's gradient to dhr, then dm = dhr W_hr over the running rows
        FUSEDRNN_LAUNCH(blocks_for(B * P), kThreads, 0, st, proj_bwd_step<Tio>)(b);
        if (n > 0) {
          const Tio* dhr_t = run.packed ? dhr + run.offset[b.t] * P : dhr + b.row0 * P;
          gemm(st, dev, blas::N, blas::N, H, n, P, 1.f, whr, bt, H, dhr_t, bt,
               run.packed ? P : bs * P, 0.f, dm, blas::R32F, H);
        }
        b.dm = dm;
        b.dslot = run.prefix(b.t) ? nullptr : run.d_slot + b.t * B;
      }
      FUSEDRNN_LAUNCH(blocks_for(B * H), kThreads, 0, st, bwd_step<C, Tio>)(b);
      if (s == 0 && !g.h0) break;  // the first step's product gives only dh0
      // dh[running rows] += their dgh W_hh; packed, a step's rows are contiguous
      const Tio* dgh_t = run.packed ? dgh + run.offset[b.t] * GH : dgh + b.row0 * GH;
      const int64_t ld = run.packed ? GH : bs * GH;
      if (run.prefix(b.t)) {
        gemm(st, dev, blas::N, blas::N, P, n, GH, 1.f, whh, bt, P, dgh_t, bt, ld, 1.f, dh,
             blas::R32F, P);
      } else if (n > 0) {
        gemm(st, dev, blas::N, blas::N, P, n, GH, 1.f, whh, bt, P, dgh_t, bt, ld, 0.f, dh_packed,
             blas::R32F, P);
        FUSEDRNN_LAUNCH(blocks_for(n * P), kThreads, 0, st, scatter_add_rows)(
            dh, P, dh_packed, run.d_rows + run.offset[b.t], n, P);
      }
    }
  };

  const Tio* hrows = nullptr;  // the state entering each row that ran, rows as dgx's (dW_hh)
  const Tio* msaved = nullptr;  // projection: o * tanh(c) of each row that ran (dW_hr)
  if (k == 0) {  // every step's values are in the cache
    const Tio* hs = c.at<Tio>(c.hprev_off);
    const float* cs = lstm ? c.at<float>(c.cs_off) : nullptr;
    const float* c0f = lstm ? c.at<float>(c.c0_off) : nullptr;
    msaved = proj ? c.at<Tio>(c.m_off) : nullptr;
    const StateBuffers sb{p, const_cast<Tio*>(hs), nullptr, nullptr, const_cast<float*>(cs),
                          nullptr, nullptr, const_cast<float*>(c0f), nullptr, nullptr};
    const float* gates = c.at<float>(c.gates_off);
    bool persistent_done = false;
    if (algo == Algo::Persistent && persistent_bwd_config(pb).ok) {
      PersistentBwdParams a{base, sb, whh, g.h0 != nullptr, {}};
      a.step.gates = gates;
      a.step.cs = cs;
      a.w_hr = whr;
      persistent_done = launch_persistent_bwd<C, Tio>(pb, st, a);
    }
    if (!persistent_done) backward_steps(sb, gates, T - 1, 0);
    hrows = hs;
    if (run.packed && R > 0) {
      Tio* hp = scratch.alloc<Tio>(R * P);
      FUSEDRNN_LAUNCH(blocks_for(R * P), kThreads, 0, st, gather_rows<Tio>)(hp, hs, P, run.d_xrows,
                                                                            R, P);
      hrows = hp;
    }
  } else {
    // Checkpointed: segment by segment from the last, recompute the segment's
    // steps from its kept state (the same kernels and products as forward, on
    // the segment's own buffers), then run its backward steps. Every row is
    // packed, so a segment's rows are one block of dgx, dgh, dhr and of the
    // kept x; the deferred products below then run over all rows at once, as
    // with the full cache.
    const int64_t nseg = (T + k - 1) / k, W = saved_width(C);
    Tio* hs = scratch.alloc<Tio>(k * B * P);
    float* cs = lstm ? scratch.alloc<float>(k * B * H) : nullptr;
    float* gates = scratch.alloc<float>(k * B * W * H);
    float* gh = scratch.alloc<float>(B * GH);
    float* hproj = proj ? scratch.alloc<float>(B * P) : nullptr;
    Tio* m = proj ? scratch.alloc<Tio>(R * H) : nullptr;
    Tio* hp = scratch.alloc<Tio>(R * P);
    Tio* packed = scratch.alloc<Tio>(B * P);
    // Each packed row's row in its segment's buffers, (s mod k) * B + b.
    std::vector<int32_t> lrow(static_cast<std::size_t>(R));
    int64_t most = 0;  // the most rows of a segment
    for (int64_t j = 0; j < nseg; ++j) {
      int64_t rows = 0;
      for (int64_t s = j * k; s < std::min(T, (j + 1) * k); ++s) {
        const int64_t t = p.t_of(s);
        for (int64_t i = run.offset[t]; i < run.offset[t] + run.count[t]; ++i)
          lrow[i] = static_cast<int32_t>((s - j * k) * B + run.host[i]);  // (host: rows first)
        rows += run.count[t];
      }
      most = std::max(most, rows);
    }
    int32_t* d_lrow = scratch.alloc<int32_t>(R);
    if (R > 0)
      check(cudaMemcpyAsync(d_lrow, lrow.data(), R * sizeof(int32_t), cudaMemcpyHostToDevice, st),
            "cudaMemcpyAsync");
    float* gx = scratch.alloc<float>(most * GH);
    // the recomputation runs the algorithm forward ran, so that its values
    // are forward's; the backward steps run `algo`
    const bool persistent_fwd = c.algo == Algo::Persistent && persistent_config(pf).ok;
    const bool persistent_bwd = algo == Algo::Persistent && persistent_bwd_config(pb).ok;
    const Tio* ckh = c.at<Tio>(c.ckh_off);
    const float* ckc = lstm ? c.at<float>(c.ckc_off) : nullptr;
    FwdStep fb{};
    fb.B = B; fb.H = H; fb.P = P; fb.bstride = bs; fb.gx = gx; fb.prow = run.d_prow; fb.gh = gh;
    fb.b_ih = c.has_b_ih ? c.at<Tio>(c.bih_off) : nullptr;
    fb.b_hh = c.has_b_hh ? c.at<Tio>(c.bhh_off) : nullptr;
    fb.gates = gates; fb.lengths = d_len; fb.mask = d_mask; fb.m = m; fb.hproj = hproj;
    for (int64_t j = nseg - 1; j >= 0; --j) {
      const int64_t s0 = j * k, s1 = std::min(T, s0 + k);
      const int64_t t_lo = std::min(p.t_of(s0), p.t_of(s1 - 1));
      const int64_t t_hi = std::max(p.t_of(s0), p.t_of(s1 - 1));
      const int64_t lo = run.offset[t_lo], rows = run.offset[t_hi] + run.count[t_hi] - lo;
      StateBuffers sb{p, hs, nullptr, nullptr, cs, nullptr, nullptr,
                      lstm ? const_cast<float*>(ckc) + j * B * H : nullptr, nullptr, nullptr};
      sb.s0 = s0;
      sb.s1 = s1;
      // the segment's input projection; its first state, from the kept one
      gemm(st, dev, blas::T, blas::N, GH, rows, I, 1.f, wih, bt, I, xc + lo * I, bt, I, 0.f, gx,
           blas::R32F, GH);
      check(cudaMemcpyAsync(hs, ckh + j * B * P, B * P * es, cudaMemcpyDeviceToDevice, st),
            "cudaMemcpyAsync");
      FwdStep f = fb;
      f.gx_row0 = lo;
      bool done = false;
      if (persistent_fwd) {
        PersistentParams a{f, sb, whh, Checkpoints{}, {}};
        a.step.gh = nullptr;
        a.w_hr = whr;
        done = launch_persistent_fwd<C, Tio>(pf, st, a);
      }
      if (!done) forward_steps<C, Tio>(p, run, f, sb, s0, s1, whh, whr, packed, nullptr);
      done = false;
      if (persistent_bwd) {
        PersistentBwdParams a{base, sb, whh, g.h0 != nullptr, {}};
        a.step.gates = gates;
        a.step.cs = cs;
        a.w_hr = whr;
        done = launch_persistent_bwd<C, Tio>(pb, st, a);
      }
      if (!done) backward_steps(sb, gates, s1 - 1, s0);
      if (rows > 0)  // the states entering the segment's rows, for dW_hh
        FUSEDRNN_LAUNCH(blocks_for(rows * P), kThreads, 0, st, gather_rows<Tio>)(
            hp + lo * P, hs, P, d_lrow + lo, rows, P);
    }
    hrows = hp;
    msaved = m;
  }
  if (g.h0)
    FUSEDRNN_LAUNCH(blocks_for(B * P), kThreads, 0, st, from_float<Tio>)(dh, static_cast<Tio*>(g.h0),
                                                                        B * P);
  if (lstm && g.c0)
    FUSEDRNN_LAUNCH(blocks_for(B * H), kThreads, 0, st, from_float<Tio>)(dc, static_cast<Tio*>(g.c0),
                                                                        B * H);
  // Deferred products over the R rows that ran (packed: dx goes back to x's
  // rows, 0 elsewhere; the states entering them are gathered for dW_hh).
  if (g.x && run.packed) check(cudaMemsetAsync(g.x, 0, N * I * es, st), "cudaMemsetAsync");
  if (g.x && R > 0) {
    Tio* dx_rows = run.packed ? scratch.alloc<Tio>(R * I) : static_cast<Tio*>(g.x);
    gemm(st, dev, blas::N, blas::N, I, R, GH, 1.f, wih, bt, I, dgx, bt, GH, 0.f, dx_rows, bt, I);
    if (run.packed)
      FUSEDRNN_LAUNCH(blocks_for(R * I), kThreads, 0, st, scatter_rows<Tio>)(
          static_cast<Tio*>(g.x), I, dx_rows, run.d_xrows, R, I);
  }
  if (R == 0) {
    zero_weight_grads();
  } else {
    gemm(st, dev, blas::N, blas::T, I, GH, R, 1.f, xc, bt, I, dgx, bt, GH, 0.f, g.w_ih, bt, I);
    gemm(st, dev, blas::N, blas::T, P, GH, R, 1.f, hrows, bt, P, dgh, bt, GH, 0.f, g.w_hh, bt, P);
    if (proj)
      gemm(st, dev, blas::N, blas::T, H, P, R, 1.f, msaved, bt, H, dhr, bt, P, 0.f, g.w_hr, bt, H);
    colsum<Tio>(scratch, st, dgx, R, GH, static_cast<Tio*>(g.b_ih));
    colsum<Tio>(scratch, st, dgh, R, GH, static_cast<Tio*>(g.b_hh));
  }
  check(cudaGetLastError(), "fusedrnn backward");
}

template <typename F>
void dispatch(Cell cell, DType dt, F&& f) {
  auto by_type = [&](auto cell_tag) {
    switch (dt) {
      case DType::F32: f(cell_tag, float{}); break;
      case DType::F16: f(cell_tag, __half{}); break;
      case DType::BF16: f(cell_tag, __nv_bfloat16{}); break;
    }
  };
  switch (cell) {
    case Cell::RnnTanh: by_type(std::integral_constant<Cell, Cell::RnnTanh>{}); break;
    case Cell::RnnRelu: by_type(std::integral_constant<Cell, Cell::RnnRelu>{}); break;
    case Cell::RnnSigmoid: by_type(std::integral_constant<Cell, Cell::RnnSigmoid>{}); break;
    case Cell::Lstm: by_type(std::integral_constant<Cell, Cell::Lstm>{}); break;
    case Cell::Gru: by_type(std::integral_constant<Cell, Cell::Gru>{}); break;
    default: throw std::invalid_argument("cell not supported by the CUDA backend");
  }
}

std::size_t align256(std::size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

Cache::Cache(const Problem& prob, const ForwardIn& in) : p(prob), lengths(in.lengths), mask(in.mask) {
  const std::size_t es = dtype_size(p.dtype);
  const std::size_t N = static_cast<std::size_t>(p.N()), B = p.B, H = p.H, I = p.I, P = p.P;
  const std::size_t GH = static_cast<std::size_t>(p.G()) * H;
  const bool lstm = p.cell == Cell::Lstm, proj = lstm && p.proj;
  std::size_t off = 0;
  auto take = [&](std::size_t bytes) {
    const std::size_t o = off;
    off += align256(bytes);
    return o;
  };
  ck = in.checkpoint;
  const bool full = ck == 0;
  has_b_ih = in.b_ih != nullptr;
  has_b_hh = in.b_hh != nullptr;
  x_rows = valid_steps(p, lengths, mask);
  x_off = take(checked_mul(checked_mul(static_cast<std::size_t>(x_rows), I), es));
  wih_off = take(checked_mul(checked_mul(GH, I), es));
  whh_off = take(checked_mul(checked_mul(GH, P), es));
  whr_off = take(proj ? checked_mul(checked_mul(P, H), es) : 0);
  if (full) {  // every step's values
    hprev_off = take(checked_mul(checked_mul(N, P), es));
    cs_off = take(lstm ? checked_mul(checked_mul(N, H), 4) : 0);
    gates_off = take(checked_mul(checked_mul(N, H), 4 * saved_width(p.cell)));
    m_off = take(proj ? checked_mul(checked_mul(static_cast<std::size_t>(x_rows), H), es) : 0);
    c0_off = take(lstm ? B * H * 4 : 0);
  } else {  // the biases (for the recomputation) and the state every ck steps
    const std::size_t kept = static_cast<std::size_t>(p.T > 0 ? (p.T + ck - 1) / ck : 0);
    bih_off = take(has_b_ih ? GH * es : 0);
    bhh_off = take(has_b_hh ? GH * es : 0);
    ckh_off = take(checked_mul(checked_mul(kept, B * P), es));
    ckc_off = take(lstm ? checked_mul(checked_mul(kept, B * H), 4) : 0);
  }
  len_off = take(lengths.empty() ? 0 : B * 4);
  mask_off = take(mask.size());
  nbytes = off;
  last_stream = p.stream;
  if (nbytes) mem = static_cast<char*>(device_alloc(nbytes, p.device, p.stream));
}

Cache::~Cache() { device_free(mem, p.device, last_stream); }

void Cache::use_on(cudaStream_t st) const {
  // Order this use after every earlier one (forward's writes, earlier
  // backwards' reads): the stream waits on an event recorded on the last
  // stream, which then becomes this one, so the destructor's free on the
  // last stream follows all uses.
  std::lock_guard<std::mutex> lock(mutex_);
  if (st == last_stream) return;
  cudaEvent_t ev;
  check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  cudaError_t e = cudaEventRecord(ev, last_stream);
  if (e == cudaSuccess) e = cudaStreamWaitEvent(st, ev, 0);
  cudaEventDestroy(ev);
  check(e, "cudaStreamWaitEvent");
  last_stream = st;
}

int64_t valid_steps(const Problem& p, const std::vector<int32_t>& lengths,
                    const std::vector<uint8_t>& mask) {
  int64_t n = 0;
  if (!lengths.empty()) {
    for (int32_t l : lengths) n += std::min<int64_t>(std::max<int64_t>(l, 0), p.T);
  } else if (!mask.empty()) {
    for (uint8_t m : mask) n += m != 0;
  } else {
    n = p.N();
  }
  return n;
}

Algo choose_algo(const Problem& p) {
  // Measured on an H200 (bench/results/cuda-nvidia-h200.txt: T = 100,
  // B in {1, 8, 64}, H in {256, 512, 1024}, float32 and bfloat16, forward and
  // forward+backward): the persistent kernels won every case up to
  // B * G * H = 16384 at B <= 8 (all of B = 1; at B = 8 lstm and gru up to
  // H = 512, rnn up to 1024), the standard algorithm from 24576 on (B = 8,
  // lstm and gru at H = 1024) and at B = 64. At B = 16, measured afterwards
  // (cuda-nvidia-h200-b16.txt), this rule's pick was within 5% of the faster
  // one in 31 of 36 cases; the worst, rnn_tanh H = 1024 bfloat16 forward
  // (B * G * H = 16384 exactly), took 1.99x the standard algorithm's time.
  // With projection the persistent forward is unmeasured: the standard algorithm.
  if (!p.proj && p.B <= 16 && p.B * p.G() * p.H <= 16384 && persistent_fits(p))
    return Algo::Persistent;
  return Algo::Standard;
}

// The layout the persistent kernels run with: the cluster mode's when
// FUSEDRNN_CUDA_PERSISTENT_CLUSTER=1 asks for it and a cluster of 8, else 16,
// blocks holds the problem; else the grid's.
PersistentLayout persistent_layout(const Problem& p, bool backward) {
  const char* e = std::getenv("FUSEDRNN_CUDA_PERSISTENT_CLUSTER");
  if (p.cluster < 0 ? e && std::string(e) == "1" : p.cluster > 0) {
    for (int size : kClusterSizes) {
      const PersistentLayout c = layout_for(p, backward, size);
      if (c.ok) return c;
    }
  }
  return layout_for(p, backward, 0);
}

bool persistent_fits(const Problem& p) {
  return persistent_config(p).ok;
}

bool TuneKey::operator<(const TuneKey& o) const {
  auto tie = [](const TuneKey& k) {
    return std::make_tuple(k.pass, k.device, static_cast<int>(k.cell), static_cast<int>(k.dtype),
                           k.T, k.B, k.I, k.H, k.P, k.checkpoint, k.lengths, k.mask, k.reverse,
                           k.batch_first, k.units);
  };
  return tie(*this) < tie(o);
}

namespace {

std::mutex g_tuned_mutex;
std::map<TuneKey, Tuned> g_tuned;

TuneKey tune_key(const Problem& p, int pass, bool lengths, bool mask, int64_t checkpoint) {
  TuneKey k;
  k.pass = pass;
  k.device = p.device;
  k.cell = p.cell;
  k.dtype = p.dtype;
  k.T = p.T; k.B = p.B; k.I = p.I; k.H = p.H; k.P = p.P;
  k.checkpoint = checkpoint;
  k.lengths = lengths;
  k.mask = mask;
  k.reverse = p.reverse;
  k.batch_first = p.batch_first;
  // (the knob changes what the persistent variants are)
  const char* u = std::getenv("FUSEDRNN_CUDA_PERSISTENT_UNITS");
  k.units = u ? std::max(1, std::atoi(u)) : 1;
  return k;
}

// Milliseconds that run() takes on stream st, between two CUDA events.
template <typename F>
float time_on(cudaStream_t st, F&& run) {
  cudaEvent_t ev[2] = {nullptr, nullptr};
  struct Destroy {
    cudaEvent_t* ev;
    ~Destroy() {
      for (int i = 0; i < 2; ++i)
        if (ev[i]) cudaEventDestroy(ev[i]);
    }
  } destroy{ev};
  for (auto& e : ev) check(cudaEventCreateWithFlags(&e, cudaEventDefault), "cudaEventCreate");
  check(cudaEventRecord(ev[0], st), "cudaEventRecord");
  run();
  check(cudaEventRecord(ev[1], st), "cudaEventRecord");
  check(cudaEventSynchronize(ev[1]), "cudaEventSynchronize");
  float ms = 0.f;
  check(cudaEventElapsedTime(&ms, ev[0], ev[1]), "cudaEventElapsedTime");
  return ms;
}

// Whether work on st is being captured into a graph (where nothing can be timed).
bool capturing(cudaStream_t st) {
  cudaStreamCaptureStatus s = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(st, &s) != cudaSuccess) {
    cudaGetLastError();
    return true;  // unknown: do not time
  }
  return s != cudaStreamCaptureStatusNone;
}

// The variants that can run p (benchmark mode): the standard algorithm, and
// the persistent kernels in grid mode and in cluster mode where each fits.
std::vector<Variant> variants(const Problem& p, bool backward) {
  std::vector<Variant> v{Variant::Standard};
  if (p.N() == 0) return v;
  for (int cl : {0, 1}) {
    Problem q = p;
    q.cluster = cl;
    const PersistentLayout c = persistent_layout(q, backward);
    if (c.ok && (c.cluster > 0) == (cl == 1)) v.push_back(cl ? Variant::Cluster : Variant::Grid);
  }
  return v;
}

Algo algo_of(Variant v) { return v == Variant::Standard ? Algo::Standard : Algo::Persistent; }

// Algorithm a as a variant (cluster mode as FUSEDRNN_CUDA_PERSISTENT_CLUSTER
// says); Algo::Auto: auto's pick.
Variant variant_of(Algo a, const Problem& p, bool backward) {
  if (a == Algo::Auto) a = choose_algo(p);
  if (a == Algo::Standard) return Variant::Standard;
  return persistent_layout(p, backward).cluster > 0 ? Variant::Cluster : Variant::Grid;
}

// Benchmark mode (rnn_cuda.h): run(v) runs the call with variant v. The call
// ends with a run of the variant that is (or was) picked for key. A known
// key costs one lookup; the candidates are laid out only on a first call,
// and `fallback` (as a variant) only under capture.
template <typename Run>
void run_tuned(const TuneKey& key, const Problem& p, bool backward, Algo fallback, Run&& run) {
  bool known = false;
  Variant pick = Variant::Standard;
  {
    std::lock_guard<std::mutex> lock(g_tuned_mutex);
    auto it = g_tuned.find(key);
    if (it != g_tuned.end()) {
      known = true;
      pick = it->second.pick;
    }
  }
  if (known) {
    run(pick);
    return;
  }
  const std::vector<Variant> cands = variants(p, backward);
  if (cands.size() == 1) {  // nothing to choose (and nothing recorded)
    run(cands[0]);
    return;
  }
  if (capturing(p.stream)) {
    run(variant_of(fallback, p, backward));
    return;
  }
  const std::size_t n = cands.size();
  std::vector<float> best(n, std::numeric_limits<float>::infinity());
  for (Variant v : cands) run(v);  // warm-up: first launches, cuBLAS's setup
  for (int rep = 0; rep < 2; ++rep)
    for (std::size_t i = 0; i < n; ++i)
      best[i] = std::min(best[i], time_on(p.stream, [&] { run(cands[i]); }));
  std::size_t win = 0;
  for (std::size_t i = 1; i < n; ++i)
    if (best[i] < best[win]) win = i;
  Tuned t;
  t.pick = cands[win];
  for (std::size_t i = 0; i < n; ++i) t.ms[static_cast<int>(cands[i])] = best[i];
  if (win + 1 != n) run(t.pick);  // the call's results are the winner's
  std::lock_guard<std::mutex> lock(g_tuned_mutex);
  g_tuned[key] = t;
}

}  // namespace

std::vector<std::pair<TuneKey, Tuned>> benchmark_table() {
  std::lock_guard<std::mutex> lock(g_tuned_mutex);
  return {g_tuned.begin(), g_tuned.end()};
}

void benchmark_clear() {
  std::lock_guard<std::mutex> lock(g_tuned_mutex);
  g_tuned.clear();
}

void forward(const Problem& p, const ForwardIn& in, void* y, void* h_n, void* c_n, Cache* cache,
             Algo algo) {
  auto run = [&](const Problem& q, Algo a, bool required) {
    dispatch(q.cell, q.dtype, [&](auto cell_tag, auto type_tag) {
      forward_impl<decltype(cell_tag)::value, decltype(type_tag)>(q, in, y, h_n, c_n, cache, a,
                                                                   required);
    });
  };
  if (algo == Algo::Benchmark) {
    if (cache) cache->benchmark = true;
    const int64_t k = cache ? cache->ck : 0;
    const TuneKey key = tune_key(p, cache ? 1 : 0, !in.lengths.empty(), !in.mask.empty(), k);
    run_tuned(key, p, false, Algo::Auto, [&](Variant v) {
      Problem q = p;
      if (v != Variant::Standard) q.cluster = v == Variant::Cluster;
      run(q, algo_of(v), false);
    });
    return;
  }
  const bool required = algo == Algo::Persistent;  // asked for, not chosen
  if (algo == Algo::Auto) algo = choose_algo(p);
  if (algo == Algo::Persistent && p.N() > 0 && !persistent_fits(p))
    throw std::invalid_argument("algo 'persistent' cannot run this problem on this device "
                                "(W_hh's slices do not fit the blocks' shared memory)");
  run(p, algo, required);
}

void backward(const Cache& cache, cudaStream_t stream, const void* dy, const void* dh_n,
              const void* dc_n, const Grads& g) {
  const Problem& p = cache.p;
  auto run = [&](Algo a, int cluster) {
    dispatch(p.cell, p.dtype, [&](auto cell_tag, auto type_tag) {
      backward_impl<decltype(cell_tag)::value, decltype(type_tag)>(cache, stream, dy, dh_n, dc_n,
                                                                    g, a, cluster);
    });
  };
  if (!cache.benchmark) {
    run(cache.algo, -1);  // the algorithm forward ran; cluster mode as the environment says
    return;
  }
  const TuneKey key = tune_key(p, 2, !cache.lengths.empty(), !cache.mask.empty(), cache.ck);
  Problem pb = p;  // (backward runs on the call's stream)
  pb.stream = stream;
  run_tuned(key, pb, true, cache.algo, [&](Variant v) {
    run(algo_of(v), v == Variant::Cluster ? 1 : 0);
  });
}

}  // namespace cuda
}  // namespace fusedrnn
