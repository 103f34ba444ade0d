// fusedrnn: CPU entry points for one recurrent layer in one direction.
//
// Shape legend in common.h. Every pointer below is to contiguous, row-major
// memory; sizes and flags travel in plain params structs (no Python here).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "fusedrnn/buffer.h"
#include "fusedrnn/common.h"

namespace fusedrnn {

template <typename scalar_t>
struct ForwardParams {
  Cell cell;
  int64_t T, B, I, H;
  bool reverse, batch_first, training;
  const scalar_t* x;        // [T, B, I], or [B, T, I] when batch_first
  const scalar_t* w_ih;     // [G*H, I]
  const scalar_t* w_hh;     // [G*H, H], or [4*H, P] with a projection
  const scalar_t* w_hr;     // [P, H]: lstm with projection (h' = W_hr (o*tanh c')), or nullptr
  int64_t P;                // projection size (with w_hr)
  const scalar_t* b_ih;     // [G*H], or nullptr for zeros
  const scalar_t* b_hh;     // [G*H], or nullptr for zeros
  const scalar_t* h0;       // [B, P], or nullptr for zeros
  const scalar_t* c0;       // [B, H] (lstm), or nullptr for zeros
  int64_t checkpoint;       // training: 0 keeps every step for backward; k > 0 keeps
                            // the state every k steps and backward recomputes the rest
  const int64_t* lengths;   // [B], values in [0, T], or nullptr
  const bool* mask;         // [T, B] (always time-major), or nullptr
  scalar_t* y;              // [T, B, P], or [B, T, P]; zero-filled by the caller when lengths
  scalar_t* h_n;            // [B, P]   (P = H unless projected)
  scalar_t* c_n;            // [B, H] (lstm), else nullptr
  bool share_weights;       // training: the cache refers to w_hh, w_hr (and w_ih when H
                            // fills whole unit blocks) instead of copying them; the
                            // caller keeps them alive and unchanged while the cache lives
};

template <typename scalar_t>
struct BackwardParams {
  const scalar_t* dy;    // [T, B, P], or [B, T, P]; nullptr for zeros
  const scalar_t* dh_n;  // [B, P], or nullptr for zeros
  const scalar_t* dc_n;  // [B, H] (lstm), or nullptr for zeros
  scalar_t* dx;          // [T, B, I], or [B, T, I]; zero-filled by the caller when lengths;
                         // nullptr: not wanted (not computed)
  scalar_t* dh0;         // [B, P]; nullptr: not wanted (the first step's product is skipped)
  scalar_t* dc0;         // [B, H] (lstm), else nullptr; nullptr for lstm: not wanted
  scalar_t* dw_ih;       // [G*H, I]
  scalar_t* dw_hh;       // [G*H, P]
  scalar_t* dw_hr;       // [P, H] with a projection, else nullptr
  scalar_t* db_ih;       // [G*H]
  scalar_t* db_hh;       // [G*H]
};

// Which rows run at each time step. Rows are reordered by decreasing length
// (stable), so the rows valid at time t are the prefix [0, count[t]) in both
// directions; row-packed arrays hold count[t] rows for time t from offset[t].
struct Schedule {
  int64_t T = 0, B = 0, N = 0;
  bool identity = true;          // perm is the identity and count[t] == B
  std::vector<int64_t> perm;     // [B] packed row -> batch row
  std::vector<int64_t> count;    // [T] rows computed at time t
  std::vector<int64_t> offset;   // [T] first packed row of time t
  void build(int64_t T, int64_t B, const int64_t* lengths);
};

// What forward keeps for backward (training=True). Row-packed, N rows; rows
// padded to Hp = H rounded up to the kernels' SIMD width (csrc/cpu/kernels.h).
struct CacheBase {
  Cell cell;
  int64_t T = 0, B = 0, I = 0, H = 0, G = 0, Hp = 0;
  int64_t P = 0, Pp = 0;  // state size (H, or the projection size) and its padding
  bool reverse = false, batch_first = false, has_lengths = false;
  bool proj = false;          // lstm with projection (w_hr)
  int64_t checkpoint = 0;     // k > 0: only ck_h/ck_c every k steps (no hprev, gates, extra, m)
  Schedule sched;
  std::vector<uint8_t> mask;  // [T, B] when a mask was given, else empty
  virtual ~CacheBase() = default;
  virtual bool is_double() const = 0;
  virtual std::size_t nbytes() const = 0;
};

template <typename scalar_t>
struct Cache : CacheBase {
  Buffer<scalar_t> x;      // [N, I] input rows (masked-out rows zeroed)
  Buffer<scalar_t> hprev;  // [N, Pp] state before the step
  Buffer<scalar_t> gates;  // [N, G*Hp] activated gates (rnn: h')
  Buffer<scalar_t> extra;  // lstm: [N, 2*Hp] (c, c'); gru: [N, Hp] hn = W_hn h + b_hn
  Buffer<scalar_t> w_ih;   // [G*Hp, I] copy of W_ih, gate blocks padded to Hp rows
  Buffer<scalar_t> w_hh;   // [G*H, P] copy of W_hh
  Buffer<scalar_t> m;      // projection: [N, Hp] m = o*tanh(c')
  Buffer<scalar_t> w_hr;   // projection: [P, H] copy of W_hr
  // checkpointed (checkpoint = k): the state before every k-th executed step,
  // and the biases in the kernels' layout, to recompute the steps between
  Buffer<scalar_t> ck_h;   // [ceil(steps / k), B, Pp]
  Buffer<scalar_t> ck_c;   // lstm: [ceil(steps / k), B, Hp]
  Buffer<scalar_t> bx, bhn;
  // share_weights: the caller's weights, used instead of the copies above
  const scalar_t* w_ih_ext = nullptr;
  const scalar_t* w_hh_ext = nullptr;
  const scalar_t* w_hr_ext = nullptr;
  const scalar_t* w_ih_data() const { return w_ih_ext ? w_ih_ext : w_ih.data(); }
  const scalar_t* w_hh_data() const { return w_hh_ext ? w_hh_ext : w_hh.data(); }
  const scalar_t* w_hr_data() const { return w_hr_ext ? w_hr_ext : w_hr.data(); }
  bool is_double() const override { return sizeof(scalar_t) == 8; }
  std::size_t nbytes() const override {
    return x.nbytes() + hprev.nbytes() + gates.nbytes() + extra.nbytes() + w_ih.nbytes() +
           w_hh.nbytes() + m.nbytes() + w_hr.nbytes() + ck_h.nbytes() + ck_c.nbytes() +
           bx.nbytes() + bhn.nbytes() + mask.size() +
           (sched.perm.size() + sched.count.size() + sched.offset.size()) * sizeof(int64_t);
  }
};

// Runs the layer; returns the cache when p.training, else nullptr.
template <typename scalar_t>
std::unique_ptr<Cache<scalar_t>> forward(const ForwardParams<scalar_t>& p);

template <typename scalar_t>
void backward(const Cache<scalar_t>& cache, const BackwardParams<scalar_t>& p);

// Threads used by one call (fusedrnn's pool; BLAS runs single-threaded
// inside it).
void set_num_threads(int n);
int get_num_threads();
// Bytes of one core's L2 cache (sysconf, else sysfs), 0 when unknown.
int64_t l2_cache_bytes();
// For tests: the inference forward's tiled input projection (rnn_impl.h,
// input_chunk_steps) forced on (mode 1, chunks of `steps` steps, 0: as
// computed; any instruction set) or off (mode 0); -1: automatic.
// tiled_input_calls: forwards that made it tiled (the counter tests read).
void set_tiled_input(int mode, int64_t steps);
int tiled_input_mode();
int64_t tiled_input_steps();
int64_t tiled_input_calls();
void count_tiled_input_call();
// Name of the SIMD kernels in use: "avx512", "avx2" or "generic".
const char* isa_name();
// Whose threads ran the last call that used several: "openmp" (the OpenMP
// runtime the process had loaded, e.g. torch's), "fusedrnn" (its own pool),
// or "" before any such call (csrc/cpu/pool.h).
const char* threads_backend();
// Benchmark ceilings (csrc/cpu/probe.cpp): float32 multiply-add peak of the
// kernels' instruction set on `threads` threads, GFLOP/s; the rate at which
// `threads` threads read a weight of `bytes` bytes over and over (each its
// share, one multiply-add per value, no synchronisation), GB/s. The best of 5
// samples of about `seconds` each.
double probe_fma_gflops(int threads, double seconds);
double probe_stream_gbps(int64_t bytes, int threads, double seconds);

}  // namespace fusedrnn
