// fusedrnn: CPU recurrence drivers (forward and backward through time).
//
// Included by one translation unit per dtype (rnn_f32.cpp, rnn_f64.cpp), which
// instantiate forward<scalar_t> and backward<scalar_t>. Layouts: kernels.h.
//
// Forward, one pool job per call (threads share fixed-size row tasks, then
// split the hidden units):
//   1. gather the valid input rows into row-packed order (skipped when x is
//      time-major and every step is valid), gx[N, G*Hp] = x W_ihᵀ by a GEMM
//      per thread over its rows, and pack each thread's unit blocks of W_hh;
//   2. per step: the micro-kernel computes h W_hhᵀ for the step's rows and
//      the thread's units in registers and runs the cell's pointwise math on
//      them (kernels_impl.h); one barrier per step.
// Backward walks the steps in reverse: per step dh += dgh W_hh (all units'
// gate gradients in, this thread's units out), then the pointwise gradient of
// the step before (dh += dy, gate gradients) on the same units; one barrier
// per step. Then dW_ih, dW_hh, dx as GEMMs split between threads by output
// rows, and bias gradients as column sums (fixed order: results do not depend
// on the thread count).
#pragma once

#include <algorithm>
#include <cstring>

#include "fusedrnn/blas.h"
#include "fusedrnn/rnn.h"
#include "kernels.h"
#include "pool.h"

namespace fusedrnn {
namespace cpu {

// Address of row (t, b) in a [T, B, W] (or [B, T, W] when batch_first) array.
template <typename P>
inline P* row_at(P* base, bool batch_first, int64_t T, int64_t B, int64_t t, int64_t b,
                 int64_t W) {
  const int64_t r = batch_first ? b * T + t : t * B + b;
  return base + r * W;
}

// Rows of y / dy at time t: row of batch row b at base + b * stride.
template <typename P>
inline P* step_base(P* base, bool batch_first, int64_t T, int64_t B, int64_t t, int64_t W,
                    int64_t* stride) {
  *stride = batch_first ? T * W : W;
  return base + (batch_first ? t * W : t * B * W);
}

template <typename S>
inline void copy_n(S* dst, const S* src, int64_t n) {
  if (n > 0) std::memcpy(dst, src, size_t(n) * sizeof(S));
}

// [begin, end) of part i of n equal parts of [0, total).
inline void split(int64_t total, int parts, int i, int64_t* begin, int64_t* end) {
  *begin = total * i / parts;
  *end = total * (i + 1) / parts;
}

// Large GEMMs are cut into tasks of fixed shape, dealt round-robin to the
// threads: every output element is computed by the same BLAS call whatever
// the thread count, so results do not depend on it.
// Task sizes depend on the problem's shape only: big enough that BLAS's
// repacking of the shared operand (W_ih for row tasks) stays small against
// the product, small enough for about 8 tasks (weight tasks: WeightTasks).
inline int64_t task_size(int64_t total, int64_t lo, int64_t hi) {
  const int64_t t = (total / 8 + 63) / 64 * 64;
  return t < lo ? lo : t > hi ? hi : t;
}
// Rows of x, dx per task: the rows are cut into equal tasks, an even number of
// them (a multiple of 4 from 4 on), so 2 or 4 threads get equal shares; one
// long last task would leave the other threads waiting at the next barrier.
inline int64_t row_task(int64_t N) {
  const int64_t t = task_size(N, 256, 1024);
  int64_t n = (N + t - 1) / t;
  n = n <= 1 ? 1 : n == 2 ? 2 : (n + 3) / 4 * 4;
  return (N + n - 1) / n;
}
// The weight-gradient tasks of a layer's backward: blocks of `rows` rows of
// one gate's part of dW_ih or dW_hh (with their bias gradient), each over one
// of `chunks` equal chunks of a segment's rows. Each task's BLAS call repacks
// its chunk of the shared operand (x or h: every row of the chunk, all
// columns), so every block a gate is cut into repacks x and h once more: in
// blocks of 256 rows, LSTM B = 128, H = 1024 spent 7% of a training call's
// samples repacking x and h, and whole gates took 0.94x its time (GRU 0.94x,
// rnn_tanh 0.95x; 0.96-0.99x at H = 256-512). So the blocks are whole gates
// (rounded up to 64 rows), and each weight's tasks are made an even number,
// so that 2 threads get equal shares of both whatever I and H are (an odd
// count cost rnn_tanh B = 32, H = 256, I = 16 3.5%). LSTM's 4 gates are; GRU
// and Elman cut the rows into 2 chunks (a checkpointed segment its own rows),
// where the layer has at least 2048 rows and the second chunk's buffer of
// partial sums takes at most 16 MiB; it is added to chunk 0's sums after the
// products. Else they cut each gate into 2 blocks of a multiple of 64 rows.
// Fixed by the shape alone, so results do not depend on the thread count.
struct WeightTasks {
  int64_t rows, chunks;
};
inline WeightTasks weight_tasks(int64_t G, int64_t H, int64_t I, int64_t P, int64_t N,
                                int64_t itemsize) {
  const int64_t whole = (H + 63) / 64 * 64, half = ((H + 1) / 2 + 63) / 64 * 64;
  if (G % 2 == 0) return {whole, 1};
  if (N >= 2048 && G * H * (I + P + 2) * itemsize <= (int64_t(16) << 20)) return {whole, 2};
  return {half, 1};  // 2 blocks (1 where H <= 64)
}

// Time step of packed row r (the last t whose rows start at or before r).
inline int64_t time_of_row(const Schedule& s, int64_t r) {
  return int64_t(std::upper_bound(s.offset.begin(), s.offset.end(), r) - s.offset.begin()) - 1;
}

inline constexpr int gates_c(Cell c) { return c == Cell::Lstm ? 4 : c == Cell::Gru ? 3 : 1; }

// Threads for a layer: no more than unit blocks, and one when a step is so
// small that a barrier would cost more than the work it shares, or when the
// whole call is: waking a worker costs 15-60 us on a virtual machine whose
// idle CPU has halted. The whole call's size is the forward's multiply-adds,
// N*G*H*(I+P) over the layer's N rows, for forward and backward alike
// (backward does about twice as many). At 2^20
// (LSTM H = 256: T = 2, B = 1) one thread and two take about as long back to
// back for the forward, and one is 15-20% faster with 0.2 ms between calls
// (as in a decoding loop); backward alone: one thread is as fast or faster up
// to about the same size (rnn_tanh 1 x 8 x 256: 1.18x, lstm 2 x 1 x 256:
// 0.97x), and two win beyond it (lstm 1 x 1 x 512: 0.67x).
// Except an inference forward on a CPU with at least 1 MiB of L2 per core whose
// weights (weight_bytes; 0 otherwise) are more than half of one core's L2 and fit
// in three quarters of the threads' L2s: on one core every call re-reads
// them from L3, on n cores each keeps its share in its L2 (2 MiB of L2 per
// core, T = 1, B = 1, H = 256, back to back: lstm 53 -> 23 us, gru 30 ->
// 19 us; in a torch model, a GRU step 81-91 -> 46-48 us, and the Linear after
// it 33-36 -> 21-23 us). With 512 KiB of L2, as on the AMD EPYC the rule
// above was measured on, nothing changes. threads_for_l2: how many of the
// n threads such a call takes, the fewest (at least 2) whose L2s hold it; 1
// where the rule does not apply.
inline int64_t threads_for_l2(int64_t weight_bytes, int64_t n) {
  const int64_t l2 = l2_cache_bytes();
  if (n < 2 || l2 < (int64_t(1) << 20) || 2 * weight_bytes <= l2) return 1;
  const int64_t need = (4 * weight_bytes + 3 * l2 - 1) / (3 * l2);
  return need > n ? 1 : need < 2 ? 2 : need;
}
inline int choose_threads(int64_t nub, int64_t B, int64_t N, int64_t G, int64_t H, int64_t I,
                          int64_t P, int64_t weight_bytes = 0) {
  int64_t n = get_num_threads();
  if (n > nub) n = nub;
  if (B * G * H * H < (int64_t(1) << 16)) n = 1;
  if (N * G * H * (I + P) <= (int64_t(1) << 20)) n = threads_for_l2(weight_bytes, n);
  return n < 1 ? 1 : int(n);
}

// Whether a layer's steps multiply the recurrent weights as stored
// (forward_step_raw) rather than a packed panel: at batch 1 a step is one pass
// over W_hh either way, and packing costs about one more pass per call; the
// panel's pass is faster (one stream in the kernel's order), so packing pays
// from a few steps on. Measured at H = 64 ... 1024: raw is as fast or faster
// up to T = 4 for every cell. Fixed by the shape, so a checkpointed backward
// recomputes exactly forward's steps.
constexpr int64_t kRawSteps = 4;
inline bool raw_weights(int64_t B, int64_t T) { return B == 1 && T <= kRawSteps; }

// The input projection of a layer of at most this many rows in all runs on
// the raw-weight product (Kernels::matmul_nt) instead of BLAS, whose packing
// of W_ih costs more than the product itself at a few rows (T = 1, B = 1:
// 2x faster at H = 256). Decided per layer, not per segment: each value is
// then computed the same way with and without checkpointing.
constexpr int64_t kRawGemmRows = 4;
inline bool raw_input(int64_t N, bool loop) { return !loop && N <= kRawGemmRows; }

// An inference forward can make the input projection on the kernels' tiles
// (Kernels::input_product) in chunks of a few steps, each just before its
// steps, rather than as BLAS GEMMs over all steps before the first. Each
// thread projects the columns of its own unit blocks, the ones its steps
// read, so they are still in its L2 when read; after one GEMM over every
// step, gx came from memory and the steps' loads waited on it (a build
// without those loads ran an LSTM inference call at B = 64, H = 512 in 8-11%
// less time).
// The steps per chunk: as many as keep a thread's part of their gx within
// half of its core's L2 (a quarter was 1-3% slower at B = 32 and 64, an
// eighth 2-7%). 0: the projection stays BLAS's, where
//  - the kernels' tiles are not the faster (Kernels::input_tiles);
//  - training: its forward saves every step's gates anyway, and was 1-3%
//    slower tiled (B = 64, H = 512);
//  - the layer is tiny or has a few rows (loop, raw_in);
//  - chunks of fewer than kTiledRows rows would not cover the sequence: each
//    chunk reads the thread's part of W_ih again (LSTM B = 128, H = 1024,
//    chunks of one step, was 9% slower).
// Fixed by the shape (and L2 size); the values do not depend on it anyway.
// (Tests force it on or off: set_tiled_input.)
constexpr int64_t kTiledRows = 256;
template <typename S>
inline size_t input_chunk_steps(const Kernels<S>& K, bool training, bool loop, bool raw_in,
                                int64_t B, int64_t GHp, int threads, size_t steps) {
  const int forced = tiled_input_mode();
  if (forced == 0 || training || loop || raw_in || (forced < 0 && !K.input_tiles)) return 0;
  int64_t l2 = l2_cache_bytes();
  if (l2 <= 0) l2 = int64_t(1) << 19;
  const int64_t per_step = std::max<int64_t>(1, B * GHp / threads * int64_t(sizeof(S)));
  const size_t chunk = size_t(std::max<int64_t>(1, l2 / 2 / per_step));
  if (forced > 0) return tiled_input_steps() > 0 ? size_t(tiled_input_steps()) : chunk;
  return chunk >= steps || int64_t(chunk) * B >= kTiledRows ? chunk : 0;
}

// Rows of [rows, H] (user layout) into [rows, Hp] with zero padding; a null
// src stands for zeros (an argument passed as None).
template <typename S>
void copy_rows_padded(S* dst, int64_t Hp, const S* src, int64_t H, const int64_t* perm,
                      int64_t rows) {
  if (!src) {
    std::fill(dst, dst + rows * Hp, S(0));
    return;
  }
  for (int64_t j = 0; j < rows; ++j) {
    copy_n(dst + j * Hp, src + perm[j] * H, H);
    std::fill(dst + j * Hp + H, dst + (j + 1) * Hp, S(0));
  }
}

template <typename S>
inline S bias_at(const S* b, int64_t i) {
  return b ? b[i] : S(0);
}

// Executed steps, in forward processing order (steps where no row is valid are
// skipped).
inline std::vector<int64_t> executed_steps(const Schedule& s, bool reverse) {
  std::vector<int64_t> steps;
  for (int64_t i = 0; i < s.T; ++i) {
    const int64_t t = reverse ? s.T - 1 - i : i;
    if (s.count[t] > 0) steps.push_back(t);
  }
  return steps;
}

// A run of consecutive executed steps, steps[s0, s1), and the packed rows they
// compute, [r0, r1) (rows of consecutive times are contiguous). The full
// cache is one segment; a checkpointed cache cuts the steps every k.
struct Segment {
  size_t s0, s1;
  int64_t r0, r1;
};

inline std::vector<Segment> segments_of(const Schedule& s, const std::vector<int64_t>& steps,
                                        int64_t k) {
  std::vector<Segment> v;
  const size_t n = steps.size(), len = k > 0 ? size_t(k) : std::max<size_t>(n, 1);
  for (size_t s0 = 0; s0 < n; s0 += len) {
    const size_t s1 = std::min(n, s0 + len);
    const int64_t a = steps[s0], b = steps[s1 - 1];
    v.push_back({s0, s1, std::min(s.offset[a], s.offset[b]),
                 std::max(s.offset[a] + s.count[a], s.offset[b] + s.count[b])});
  }
  return v;
}

inline int64_t max_rows(const std::vector<Segment>& segs) {
  int64_t m = 0;
  for (const Segment& g : segs) m = std::max(m, g.r1 - g.r0);
  return m;
}

// Biases in the kernels' layout: bx [nub][G][U] = b_ih + b_hh (gru's n gate:
// b_ih only) and gru's bhn [nub][U] = b_hn.
template <Cell C, typename S>
void pack_biases(const S* b_ih, const S* b_hh, int64_t H, int64_t nub, int64_t U, Buffer<S>* bx,
                 Buffer<S>* bhn) {
  const int64_t G = gates_c(C);
  bx->resize(checked_mul(nub * G, U));
  bhn->resize(C == Cell::Gru ? checked_mul(nub, U) : 0);
  for (int64_t u = 0; u < nub; ++u)
    for (int64_t v = 0; v < U; ++v) {
      const int64_t unit = u * U + v;
      for (int64_t g = 0; g < G; ++g) {
        const bool hh = !(C == Cell::Gru && g == 2);  // gru's b_hn stays inside r*(...)
        bx->data()[(u * G + g) * U + v] =
            unit < H ? bias_at(b_ih, g * H + unit) + (hh ? bias_at(b_hh, g * H + unit) : S(0))
                     : S(0);
      }
      if (C == Cell::Gru) bhn->data()[u * U + v] = unit < H ? bias_at(b_hh, 2 * H + unit) : S(0);
    }
}

// A layer so small that its products run as plain loops (blas.h).
inline bool tiny_layer(int64_t N, int64_t GHp, int64_t I, int64_t P) {
  return N * GHp * std::max(I, P) <= kTinyGemm;
}

// Forward steps of one thread, shared by forward and by the recomputation in
// a checkpointed backward. Rows of gx and of the saved values are counted
// from the segment's first row r0.
template <Cell C, typename S>
struct Stepper {
  const Kernels<S>& K;
  const Schedule& sched;
  int64_t T, B, H, Hp, P, Pp, E;
  bool proj, batch_first;
  const S *wp, *wr, *bx, *bhn;
  const S *w_raw, *wr_raw;  // raw_weights: W_hh [G*H, P] and W_hr [P, H] as stored,
                            // used instead of the panels wp, wr (else nullptr)
  const uint8_t* mask;   // [T, B] or nullptr
  S* y;                  // user output [T, B, P] (or [B, T, P]), or a [B, P] scratch row
  bool y_scratch;        // y is the scratch: every step writes it
  S* c;                  // [B, Hp] lstm cell state
  S *gx, *hprev, *extra, *m;  // segment-relative rows; hprev/extra null: nothing saved
  S* m_step;             // projection without saving: m of one step [B, Hp]
  S* scratch;            // this thread's partial sums
  int64_t ub0, ub1, pb0, pb1;

  // One step; h, h_next: [B, Pp] state before / after. Ends with a barrier.
  void step(Team& team, int64_t t, int64_t r0, const S* h, S* h_next) const {
    const int64_t off = sched.offset[t], rel = off - r0, G = gates_c(C), GHp = G * Hp;
    const bool save = hprev != nullptr;
    FwdStep<S> a;
    a.cell = C;
    a.H = H;
    a.Hp = Hp;
    a.n = sched.count[t];
    a.wp = wp;
    a.w = w_raw;
    a.ldw = P;
    a.bx = bx;
    a.bhn = bhn;
    a.in = h;
    a.K = P;
    a.ld_in = Pp;
    a.h = h;
    a.h_next = h_next;
    a.c = c;
    a.gx = gx + rel * GHp;
    a.valid = mask ? mask + t * B : nullptr;
    if (y_scratch) {
      a.y = y;
      a.y_stride = P;
    } else {
      a.y = step_base(y, batch_first, T, B, t, P, &a.y_stride);
    }
    a.perm = sched.perm.data();
    a.save = save;
    a.hprev = save ? hprev + rel * Pp : nullptr;
    a.extra = save ? extra + rel * E : nullptr;
    a.scratch = scratch;
    a.m = !proj ? nullptr : save ? m + rel * Hp : m_step;
    K.forward_step(a, ub0, ub1);
    team.barrier();
    if (proj) {  // h' = W_hr m, over the P units
      FwdStep<S> b = a;
      b.cell = Cell::Proj;
      b.H = P;
      b.Hp = Pp;
      b.wp = wr;
      b.w = wr_raw;
      b.ldw = H;
      b.bx = b.bhn = nullptr;
      b.in = a.m;
      b.K = H;
      b.ld_in = Hp;
      b.c = b.gx = b.extra = b.m = nullptr;
      K.forward_step(b, pb0, pb1);
      team.barrier();
    }
  }
};

// The tasks of a GEMM with `rows` output rows of `cols` columns and inner
// size `inner`: blocks of row_task rows; when the rows make a single task
// (few steps × rows) and the product is large, column blocks instead, so
// every thread still gets a share. Fixed by the shape alone.
struct GemmTasks {
  int64_t rows, cols, rt, ct, nr, nc;
  int64_t count() const { return nr * nc; }
  // rows [*a, *b) and columns [*c0, *c1) of task i
  void at(int64_t i, int64_t* a, int64_t* b, int64_t* c0, int64_t* c1) const {
    *a = i / nc * rt;
    *b = std::min(rows, *a + rt);
    *c0 = i % nc * ct;
    *c1 = std::min(cols, *c0 + ct);
  }
};

inline GemmTasks gemm_tasks(int64_t rows, int64_t cols, int64_t inner) {
  GemmTasks g{rows, cols, row_task(rows), cols, 0, 1};
  g.nr = rows > 0 ? (rows + g.rt - 1) / g.rt : 0;
  if (g.nr == 1 && rows * cols * inner >= (int64_t(1) << 21) && cols >= 256) {
    g.ct = (cols + 4 * 16 - 1) / (4 * 16) * 16;  // a quarter, in whole 16-column groups
    g.nc = (cols + g.ct - 1) / g.ct;              // 4 for every cols >= 256
  }
  return g;
}

// gx rows [r0, r1) = x rows W_ihᵀ, in the tasks of gemm_tasks (fixed by the
// segment's size, so a recomputation repeats forward's BLAS calls exactly),
// or, when raw (raw_input), by K.matmul_nt with the columns split between the
// threads. gx is segment-relative. prepare(a, b) fills x's rows [a, b) first
// (forward's gather): in each row task, or, when the threads split the
// columns (column tasks, raw), split between the threads before a barrier.
// Ends without a barrier.
template <typename S, typename Prepare>
void input_gemm(const Kernels<S>& K, Team& team, int tid, int64_t r0, int64_t r1, const S* x,
                int64_t I, const S* w_ih, S* gx, int64_t GHp, bool loop, bool raw,
                Prepare&& prepare) {
  const int nt = team.size();
  const int64_t rows = r1 - r0;
  const GemmTasks g = gemm_tasks(rows, GHp, I);
  if (raw || g.nc > 1) {
    int64_t a, b;
    split(rows, nt, tid, &a, &b);
    prepare(r0 + a, r0 + b);
    team.barrier();
  }
  if (raw) {
    int64_t a, b;
    split(GHp / K.lanes, nt, tid, &a, &b);  // GHp is whole unit blocks
    K.matmul_nt(x + r0 * I, I, rows, w_ih, I, I, gx, GHp, a * K.lanes, b * K.lanes);
    return;
  }
  for (int64_t i = tid; i < g.count(); i += nt) {
    int64_t a, b, c0, c1;
    g.at(i, &a, &b, &c0, &c1);
    if (g.nc == 1) prepare(r0 + a, r0 + b);
    gemm<S>(false, true, b - a, c1 - c0, I, 1, x + (r0 + a) * I, I, w_ih + c0 * I, I, 0,
            gx + a * GHp + c0, GHp, loop);
  }
}

// db[k] (=|+=) the sum over rows r of a[r * ld + k], k < cols: columns in
// groups summed in a local array (vectorized; db and a are never the same
// memory), rows in order.
template <typename S>
void add_column_sums(S* db, bool set, const S* a, int64_t rows, int64_t cols, int64_t ld) {
  constexpr int64_t W = 64;
  for (int64_t k0 = 0; k0 < cols; k0 += W) {
    const int64_t w = std::min(W, cols - k0);
    alignas(64) S acc[W] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const S* __restrict row = a + r * ld + k0;
      for (int64_t k = 0; k < w; ++k) acc[k] += row[k];
    }
    for (int64_t k = 0; k < w; ++k) db[k0 + k] = set ? acc[k] : db[k0 + k] + acc[k];
  }
}

// dst[0 .. n) += src[0 .. n)
template <typename S>
void add_to(S* __restrict dst, const S* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// ---------------------------------------------------------------- forward

template <Cell C, typename S>
std::unique_ptr<Cache<S>> forward_cell(const ForwardParams<S>& p) {
  const Kernels<S>& K = kernels<S>();
  const int64_t T = p.T, B = p.B, I = p.I, H = p.H, G = gates_c(C);
  const int64_t U = K.lanes, nub = (H + U - 1) / U, Hp = nub * U, GHp = G * Hp;
  const int64_t E = C == Cell::Lstm ? 2 * Hp : C == Cell::Gru ? Hp : 0;  // extra per row
  const bool bf = p.batch_first;
  // LSTM with projection: the state h has P values (padded to Pp), c has H.
  const bool proj = C == Cell::Lstm && p.w_hr;
  const int64_t P = proj ? p.P : H, nubP = (P + U - 1) / U, Pp = nubP * U;

  Schedule sched;
  sched.build(T, B, p.lengths);
  const int64_t N = sched.N;
  // x feeds the input GEMM as it is when time-major with every step valid;
  // otherwise its rows are gathered, masked-out rows zeroed so whatever they
  // hold (NaN for missing data) reaches no gradient.
  const bool direct_x = sched.identity && !bf && !p.mask;
  const std::vector<int64_t> steps = executed_steps(sched, p.reverse);
  const bool loop = tiny_layer(N, GHp, I, P);
  const bool raw_in = raw_input(N, loop);
  // (inference only: a training forward on more threads than its backward,
  // which reads the same weights, left the pair up to 13% slower)
  const int64_t weight_bytes = (G * H * (I + P) + (proj ? P * H : 0)) * int64_t(sizeof(S));
  const int threads = choose_threads(std::max(nub, nubP), B, N, G, H, I, P,
                                     p.training ? 0 : weight_bytes);
  // tiled input projection: steps per chunk (0: BLAS)
  const size_t chunk =
      input_chunk_steps(K, p.training, loop, raw_in, B, GHp, threads, steps.size());
  const bool tiled_in = chunk > 0;
  if (tiled_in) count_tiled_input_call();
  // Full cache: one segment, saving every step. Checkpointed: the state at
  // the start of every k-step segment, nothing else. Inference: one segment,
  // or with tiled input one per chunk, so gx holds one chunk's rows.
  const int64_t ck = p.training ? p.checkpoint : 0;
  const std::vector<Segment> segs = segments_of(sched, steps, tiled_in ? int64_t(chunk) : ck);
  const bool save = p.training && ck == 0;

  std::unique_ptr<Cache<S>> cache;
  Buffer<S> x_tmp, gx_tmp, w_ih_tmp;
  S *xp = nullptr, *gx;
  S* w_ih_pad = nullptr;  // W_ih with gate blocks padded to Hp rows
  // the cache refers to the caller's weights; W_ih only when it needs no padding
  const bool share = p.training && p.share_weights, share_ih = share && Hp == H;
  if (p.training) {
    cache = std::make_unique<Cache<S>>();
    cache->x.resize(checked_mul(N, I));
    if (!share_ih) cache->w_ih.resize(checked_mul(GHp, I));
    if (!share) cache->w_hh.resize(checked_mul(G * H, P));
    if (proj && !share) cache->w_hr.resize(checked_mul(P, H));
    xp = cache->x.data();
    w_ih_pad = share_ih ? nullptr : cache->w_ih.data();
    if (save) {
      cache->hprev.resize(checked_mul(N, Pp));
      cache->gates.resize(checked_mul(N, GHp));
      cache->extra.resize(checked_mul(N, E));
      if (proj) cache->m.resize(checked_mul(N, Hp));
    } else {
      cache->ck_h.resize(checked_mul(checked_mul(int64_t(segs.size()), B), Pp));
      if (C == Cell::Lstm) cache->ck_c.resize(checked_mul(checked_mul(int64_t(segs.size()), B), Hp));
    }
  } else {
    if (!direct_x) x_tmp.resize(checked_mul(N, I));
    xp = direct_x ? nullptr : x_tmp.data();
    if (Hp != H && !tiled_in) {  // (tiled input packs W_ih as it is)
      w_ih_tmp.resize(checked_mul(GHp, I));
      w_ih_pad = w_ih_tmp.data();
    }
  }
  if (save) {
    gx = cache->gates.data();
  } else {
    gx_tmp.resize(checked_mul(max_rows(segs), GHp));
    gx = gx_tmp.data();
  }
  const S* x_gemm = direct_x && !p.training ? p.x : xp;

  // W_ih with each gate block padded to Hp rows (the input GEMM's where
  // Hp != H, and the cache's copy when training): made in the pool job below,
  // with the cache's other weight copies. Biases in the kernels' layout.
  const S* w_ih_gemm = w_ih_pad && Hp != H ? w_ih_pad : p.w_ih;
  Buffer<S> bx, bhn;
  pack_biases<C, S>(p.b_ih, p.b_hh, H, nub, U, &bx, &bhn);

  const bool raw = raw_weights(B, T);
  Buffer<S> wp(raw ? 0 : checked_mul(checked_mul(nub, P), G * U));
  Buffer<S> hA(checked_mul(B, Pp)), hB(checked_mul(B, Pp));
  Buffer<S> c(C == Cell::Lstm ? checked_mul(B, Hp) : 0);
  copy_rows_padded(hA.data(), Pp, p.h0, P, sched.perm.data(), B);
  copy_n(hB.data(), hA.data(), B * Pp);
  // projection: its forward panel, and m = o*tanh(c') of a step when not saving
  Buffer<S> wr(proj && !raw ? checked_mul(checked_mul(nubP, H), U) : 0);
  Buffer<S> m_step(proj && !save ? checked_mul(B, Hp) : 0);
  if (C == Cell::Lstm) copy_rows_padded(c.data(), Hp, p.c0, H, sched.perm.data(), B);

  // tiled input: the forward panel of W_ih (K = I)
  Buffer<S> wpi(tiled_in ? checked_mul(checked_mul(nub, I), G * U) : 0);
  const int64_t scratch_per_thread = B * 2 * G * U;
  Buffer<S> scratch(checked_mul(threads, scratch_per_thread));

  ThreadPool::run(threads, [&](int tid, Team& team) {
    const int nt = team.size();
    Stepper<C, S> st{K, sched, T, B, H, Hp, P, Pp, E, proj, bf};
    st.wp = wp.data();
    st.wr = wr.data();
    st.w_raw = raw ? p.w_hh : nullptr;
    st.wr_raw = raw && proj ? p.w_hr : nullptr;
    st.bx = bx.data();
    st.bhn = bhn.data();
    st.mask = reinterpret_cast<const uint8_t*>(p.mask);
    st.y = p.y;
    st.y_scratch = false;
    st.c = c.data();
    st.gx = gx;
    st.hprev = save ? cache->hprev.data() : nullptr;
    st.extra = save ? cache->extra.data() : nullptr;
    st.m = save && proj ? cache->m.data() : nullptr;
    st.m_step = m_step.data();
    st.scratch = scratch.data() + tid * scratch_per_thread;
    split(nub, nt, tid, &st.ub0, &st.ub1);
    split(nubP, nt, tid, &st.pb0, &st.pb1);
    // this thread's part of the W_hh (and W_hr) panels
    if (!raw) {
      K.pack_fwd(p.w_hh, G, H, P, wp.data(), st.ub0, st.ub1);
      if (proj) K.pack_fwd(p.w_hr, 1, P, H, wr.data(), st.pb0, st.pb1);
    }
    // W_ih padded, and the copies of W_hh and W_hr the cache keeps (training
    // without share_weights): each thread a share of the rows. Of them only the
    // input GEMM reads W_ih padded in this call, after a barrier. (Made by the
    // caller alone before and after the job, they took 14-18% of a training
    // forward at B = 1, H = 256: lstm 1.18 -> 1.01 ms, gru 0.93 -> 0.76 ms.)
    if (w_ih_pad) {
      int64_t a, b;
      split(GHp, nt, tid, &a, &b);
      for (int64_t r = a; r < b; ++r) {
        S* dst = w_ih_pad + r * I;
        if (r % Hp < H) copy_n(dst, p.w_ih + (r / Hp * H + r % Hp) * I, I);
        else std::fill(dst, dst + I, S(0));
      }
    }
    if (cache && !share) {
      int64_t a, b;
      split(G * H * P, nt, tid, &a, &b);
      copy_n(cache->w_hh.data() + a, p.w_hh + a, b - a);
      if (proj) {
        split(P * H, nt, tid, &a, &b);
        copy_n(cache->w_hr.data() + a, p.w_hr + a, b - a);
      }
    }
    if (w_ih_gemm != p.w_ih) team.barrier();
    if (tiled_in) K.pack_fwd(p.w_ih, G, H, I, wpi.data(), st.ub0, st.ub1);
    // x's rows [r0, r1) where the projection reads them: gathered (and
    // masked-out rows zeroed), or copied into the cache when training
    auto prepare = [&](int64_t r0, int64_t r1) {
      if (!direct_x) {
        for (int64_t r = r0, t = time_of_row(sched, r0); r < r1; ++r) {
          while (r >= sched.offset[t] + sched.count[t]) ++t;
          const int64_t j = r - sched.offset[t];
          S* dst = xp + r * I;
          if (p.mask && !p.mask[t * B + j]) std::fill(dst, dst + I, S(0));
          else copy_n(dst, row_at(p.x, bf, T, B, t, sched.perm[j], I), I);
        }
      } else if (p.training) {
        copy_n(xp + r0 * I, p.x + r0 * I, (r1 - r0) * I);
      }
    };
    S* h = hA.data();
    S* h_next = hB.data();
    for (size_t i = 0; i < segs.size(); ++i) {
      const Segment& sg = segs[i];
      if (ck && tid == 0) {  // the checkpoint: state before the segment
        copy_n(cache->ck_h.data() + i * B * Pp, h, B * Pp);
        if (C == Cell::Lstm) copy_n(cache->ck_c.data() + i * B * Hp, c.data(), B * Hp);
      }
      // 1. input rows and input projection: in row tasks, or (tiled input)
      // this thread's columns, which only its own steps read
      if (tiled_in) {
        if (!direct_x) {
          int64_t a, b;
          split(sg.r1 - sg.r0, nt, tid, &a, &b);
          prepare(sg.r0 + a, sg.r0 + b);
          team.barrier();
        }
        K.input_product(x_gemm + sg.r0 * I, I, sg.r1 - sg.r0, wpi.data(), G, I, gx, Hp, st.ub0,
                        st.ub1);
      } else {
        input_gemm<S>(K, team, tid, sg.r0, sg.r1, x_gemm, I, w_ih_gemm, gx, GHp, loop, raw_in,
                      prepare);
        team.barrier();
      }
      // 2. the recurrence
      for (size_t s = sg.s0; s < sg.s1; ++s) {
        st.step(team, steps[s], sg.r0, h, h_next);
        std::swap(h, h_next);
      }
    }
  });

  // Final states. Without lengths every row ran every step: the last buffer
  // written holds them. With lengths a row's last state is its last output.
  const S* h_last = steps.size() % 2 ? hB.data() : hA.data();
  for (int64_t j = 0; j < B; ++j) {
    const int64_t b = sched.perm[j];
    S* hn = p.h_n + b * P;
    if (!p.lengths) {
      copy_n(hn, h_last + j * Pp, P);
    } else if (p.lengths[b] == 0) {
      if (p.h0) copy_n(hn, p.h0 + b * P, P);
      else std::fill(hn, hn + P, S(0));
    } else {
      const int64_t t_last = p.reverse ? 0 : p.lengths[b] - 1;
      copy_n(hn, row_at(p.y, bf, T, B, t_last, b, P), P);
    }
    if (C == Cell::Lstm) copy_n(p.c_n + b * H, c.data() + j * Hp, H);
  }

  if (cache) {
    cache->cell = C;
    cache->T = T;
    cache->B = B;
    cache->I = I;
    cache->H = H;
    cache->G = G;
    cache->Hp = Hp;
    cache->P = P;
    cache->Pp = Pp;
    cache->reverse = p.reverse;
    cache->batch_first = bf;
    cache->has_lengths = p.lengths != nullptr;
    cache->checkpoint = ck;
    cache->proj = proj;
    if (p.mask) cache->mask.assign(p.mask, p.mask + T * B);
    if (share_ih) cache->w_ih_ext = p.w_ih;
    if (share) {
      cache->w_hh_ext = p.w_hh;
      cache->w_hr_ext = proj ? p.w_hr : nullptr;
    }
    if (ck) {
      cache->bx = std::move(bx);
      cache->bhn = std::move(bhn);
    }
    cache->sched = std::move(sched);
  }
  return cache;
}

// ---------------------------------------------------------------- backward

template <Cell C, typename S>
void backward_cell(const Cache<S>& cache, const BackwardParams<S>& p) {
  const Kernels<S>& K = kernels<S>();
  const int64_t T = cache.T, B = cache.B, I = cache.I, H = cache.H, G = gates_c(C);
  const int64_t U = K.lanes, nub = (H + U - 1) / U, Hp = cache.Hp, GHp = G * Hp;
  const int64_t E = C == Cell::Lstm ? 2 * Hp : C == Cell::Gru ? Hp : 0;
  const Schedule& sched = cache.sched;
  const bool bf = cache.batch_first;
  const bool proj = C == Cell::Lstm && cache.proj;
  const int64_t P = cache.P, nubP = (P + U - 1) / U, Pp = cache.Pp;
  if (Hp != nub * U || Pp != nubP * U) throw std::logic_error("fusedrnn: cache from other kernels");
  const std::vector<int64_t> steps = executed_steps(sched, cache.reverse);
  const int64_t ck = cache.checkpoint;
  const std::vector<Segment> segs = segments_of(sched, steps, ck);
  const int64_t R = max_rows(segs);  // rows of the largest segment (N for the full cache)
  const bool loop = tiny_layer(sched.N, GHp, I, P);
  const bool raw_in = raw_input(sched.N, loop);
  // C[M, N] (beta 0: =, 1: +=) op(A) B, op(A) = A or Aᵀ (ta): the backward's
  // products. A layer of at most kRawGemmRows rows runs them on K.matmul_nn:
  // their inner dimension (weight gradients) or their rows (dx) are those
  // rows, and BLAS would cost more in set-up (C's zeroing, packing) than the
  // product.
  auto product = [&](bool ta, int64_t M, int64_t N, int64_t Kd, const S* A, int64_t lda,
                     const S* Bm, int64_t ldb, S beta, S* Cm, int64_t ldc) {
    if (raw_in)
      K.matmul_nn(A, ta ? 1 : lda, ta ? lda : 1, M, Bm, ldb, Kd, Cm, ldc, 0, N, beta != S(0));
    else
      gemm<S>(ta, false, M, N, Kd, 1, A, lda, Bm, ldb, beta, Cm, ldc, loop);
  };

  // Gate gradients of a segment's rows; the weight gradients sum over segments.
  Buffer<S> dgx(checked_mul(R, GHp)), dgh_own(C == Cell::Gru ? checked_mul(R, GHp) : 0);
  S* dgh = C == Cell::Gru ? dgh_own.data() : dgx.data();
  // Where both bias gradients are the column sums of the same gate gradients
  // (all cells but GRU), db_hh is computed once, as db_ih, and copied at the end.
  const bool same_bias_grad = dgh == dgx.data();
  Buffer<S> dh(checked_mul(B, Pp)), dc(C == Cell::Lstm ? checked_mul(B, Hp) : 0);
  copy_rows_padded(dh.data(), Pp, p.dh_n, P, sched.perm.data(), B);
  if (C == Cell::Lstm) copy_rows_padded(dc.data(), Hp, p.dc_n, H, sched.perm.data(), B);
  // W_hh's backward panel: output units are the state's (P of them); none
  // when the products read W_hh as stored (raw_weights)
  const bool raw = raw_weights(B, T);
  Buffer<S> wb(raw ? 0 : checked_mul(checked_mul(nubP, GHp), U));
  // projection: W_hr's backward panel, dL/dh' of every step, dL/dm of a step
  Buffer<S> wrb(proj && !raw ? checked_mul(checked_mul(nub, Pp), U) : 0);
  Buffer<S> dproj(proj ? checked_mul(R, Pp) : 0), dm(proj ? checked_mul(B, Hp) : 0);
  const bool direct_dx = sched.identity && !bf;
  Buffer<S> dxp(direct_dx || !p.dx ? 0 : checked_mul(R, I));
  // Partial weight gradients of row chunks 1 .. kc-1 (see WeightTasks).
  const WeightTasks dw = weight_tasks(G, H, I, P, sched.N, int64_t(sizeof(S)));
  Buffer<S> dw_part_ih(checked_mul(checked_mul(dw.chunks - 1, G * H), I));
  Buffer<S> dw_part_hh(checked_mul(checked_mul(dw.chunks - 1, G * H), P));
  Buffer<S> db_part(checked_mul(dw.chunks - 1, 2 * G * H));
  // chunk c > 0's partial sums of dW_hh (hh) or dW_ih, and of their bias gradient
  auto part_w = [&](bool hh, int64_t c) {
    return (hh ? dw_part_hh : dw_part_ih).data() + (c - 1) * G * H * (hh ? P : I);
  };
  auto part_b = [&](bool hh, int64_t c) { return db_part.data() + ((c - 1) * 2 + hh) * G * H; };

  // Checkpointed: each segment's saved values are recomputed from its
  // checkpoint before its backward steps.
  const bool recompute = ck > 0;
  Buffer<S> wp, wr, hA, hB, c, hprev_r, gates_r, extra_r, m_r, y_r;
  const int threads = choose_threads(std::max(nub, nubP), B, sched.N, G, H, I, P);
  const int64_t scratch_per_thread = B * 2 * G * U;
  Buffer<S> scratch;
  if (recompute) {
    if (!raw) wp.resize(checked_mul(checked_mul(nub, P), G * U));
    if (proj && !raw) wr.resize(checked_mul(checked_mul(nubP, H), U));
    hA.resize(checked_mul(B, Pp));
    hB.resize(checked_mul(B, Pp));
    if (C == Cell::Lstm) c.resize(checked_mul(B, Hp));
    hprev_r.resize(checked_mul(R, Pp));
    gates_r.resize(checked_mul(R, GHp));
    extra_r.resize(checked_mul(R, E));
    if (proj) m_r.resize(checked_mul(R, Hp));
    y_r.resize(checked_mul(B, P));
    scratch.resize(checked_mul(threads, scratch_per_thread));
  }
  // What backward reads of the segment starting at row r0: the cache's rows
  // from r0, or the segment's recomputed rows.
  auto saved = [&](const Buffer<S>& full, const Buffer<S>& rec, int64_t width, int64_t r0) {
    return recompute ? rec.data() : full.data() + r0 * width;
  };

  ThreadPool::run(threads, [&](int tid, Team& team) {
    const int nt = team.size();
    int64_t ub0, ub1, pb0, pb1;
    split(nub, nt, tid, &ub0, &ub1);
    split(nubP, nt, tid, &pb0, &pb1);
    // Rows of a step relative to its segment's first row r0.
    auto step_args = [&](int64_t t, int64_t r0) {
      const int64_t rel = sched.offset[t] - r0;
      BwdStep<S> a;
      a.cell = C;
      a.H = H;
      a.Hp = Hp;
      a.n = sched.count[t];
      a.wb = wb.data();
      a.w = raw ? cache.w_hh_data() : nullptr;
      a.ldw = P;
      a.gates = saved(cache.gates, gates_r, GHp, r0) + rel * GHp;
      a.extra = saved(cache.extra, extra_r, E, r0) + rel * E;
      a.hprev = saved(cache.hprev, hprev_r, Pp, r0) + rel * Pp;
      a.valid = cache.mask.empty() ? nullptr : cache.mask.data() + t * B;
      a.dy = p.dy ? step_base(p.dy, bf, T, B, t, H, &a.dy_stride) : nullptr;
      a.perm = sched.perm.data();
      a.dh = dh.data();
      a.dc = dc.data();
      a.dgx = dgx.data() + rel * GHp;
      a.dgh = dgh + rel * GHp;
      a.G = G;
      a.K = H;
      a.Kp = Hp;
      a.out = dh.data();
      a.ld_out = Pp;
      a.accumulate = true;
      if (proj) {  // the cell's point gradient starts from dL/dm, not from dh and dy
        a.dy = nullptr;
        a.dh = dm.data();
      }
      return a;
    };
    // projection h' = W_hr m: the point gradient is dh' (+ dy); the product
    // dm = dh' W_hr
    auto proj_args = [&](int64_t t, int64_t r0) {
      const int64_t rel = sched.offset[t] - r0;
      BwdStep<S> a{};
      a.cell = Cell::Proj;
      a.H = P;
      a.Hp = Pp;
      a.n = sched.count[t];
      a.wb = wrb.data();
      a.w = raw ? cache.w_hr_data() : nullptr;
      a.ldw = H;
      a.valid = cache.mask.empty() ? nullptr : cache.mask.data() + t * B;
      a.dy = p.dy ? step_base(p.dy, bf, T, B, t, P, &a.dy_stride) : nullptr;
      a.perm = sched.perm.data();
      a.dh = dh.data();
      a.dgx = a.dgh = dproj.data() + rel * Pp;
      a.G = 1;
      a.K = P;
      a.Kp = Pp;
      a.out = dm.data();
      a.ld_out = Hp;
      a.accumulate = false;
      return a;
    };
    Stepper<C, S> st{K, sched, T, B, H, Hp, P, Pp, E, proj, bf};
    if (recompute) {
      st.wp = wp.data();
      st.wr = wr.data();
      st.w_raw = raw ? cache.w_hh_data() : nullptr;
      st.wr_raw = raw && proj ? cache.w_hr_data() : nullptr;
      st.bx = cache.bx.data();
      st.bhn = cache.bhn.data();
      st.mask = cache.mask.empty() ? nullptr : cache.mask.data();
      st.y = y_r.data();
      st.y_scratch = true;
      st.c = c.data();
      st.gx = gates_r.data();
      st.hprev = hprev_r.data();
      st.extra = extra_r.data();
      st.m = m_r.data();
      st.m_step = nullptr;
      st.scratch = scratch.data() + tid * scratch_per_thread;
      st.ub0 = ub0;
      st.ub1 = ub1;
      st.pb0 = pb0;
      st.pb1 = pb1;
      if (!raw) {
        K.pack_fwd(cache.w_hh_data(), G, H, P, wp.data(), ub0, ub1);
        if (proj) K.pack_fwd(cache.w_hr_data(), 1, P, H, wr.data(), pb0, pb1);
      }
    }
    if (!raw) {
      K.pack_bwd(cache.w_hh_data(), G, H, Hp, P, wb.data(), pb0, pb1);
      if (proj) K.pack_bwd(cache.w_hr_data(), 1, P, Pp, H, wrb.data(), ub0, ub1);
    }
    const int64_t wt = dw.rows, per_gate = (H + wt - 1) / wt, kc = dw.chunks;
    const int64_t dw_tasks = 2 * G * per_gate * kc;
    for (size_t i = segs.size(); i-- > 0;) {
      const Segment& sg = segs[i];
      const int64_t r0 = sg.r0, rows = sg.r1 - sg.r0;
      const S zero_or_add = i + 1 == segs.size() ? S(0) : S(1);  // the first one sets
      if (recompute) {
        if (tid == 0) {
          // both state buffers: rows that start later in the segment (reverse
          // with lengths) read whichever one is current then
          copy_n(hA.data(), cache.ck_h.data() + i * B * Pp, B * Pp);
          copy_n(hB.data(), hA.data(), B * Pp);
          if (C == Cell::Lstm) copy_n(c.data(), cache.ck_c.data() + i * B * Hp, B * Hp);
        }
        input_gemm<S>(K, team, tid, sg.r0, sg.r1, cache.x.data(), I, cache.w_ih_data(),
                      gates_r.data(), GHp, loop, raw_in, [](int64_t, int64_t) {});
        team.barrier();
        S* h = hA.data();
        S* h_next = hB.data();
        for (size_t s = sg.s0; s < sg.s1; ++s) {
          st.step(team, steps[s], r0, h, h_next);
          std::swap(h, h_next);
        }
      }
      // Steps in reverse. The pointwise gradient of a step touches only this
      // thread's units; the product dh += dgh W_hh reads every unit's dgh. So
      // each thread runs product(s) then pointwise(s-1) on its units, and one
      // barrier per step separates them from the next product.
      if (!proj) {
        K.backward_point(step_args(steps[sg.s1 - 1], r0), ub0, ub1);
        team.barrier();
        for (size_t s = sg.s1; s-- > sg.s0;) {
          // the first step's product gives only dh0
          if (s > 0 || p.dh0) K.backward_product(step_args(steps[s], r0), ub0, ub1);
          if (s > sg.s0) K.backward_point(step_args(steps[s - 1], r0), ub0, ub1);
          team.barrier();
        }
      } else {
        // Per step: dh' (P units) | barrier | dm = dh' W_hr and the cell's point
        // gradient (H units) | barrier | dh = dgates W_hh (P units), then dh'
        // of the step before on the same units.
        K.backward_point(proj_args(steps[sg.s1 - 1], r0), pb0, pb1);
        team.barrier();
        for (size_t s = sg.s1; s-- > sg.s0;) {
          K.backward_product(proj_args(steps[s], r0), ub0, ub1);
          K.backward_point(step_args(steps[s], r0), ub0, ub1);
          team.barrier();
          if (s > 0 || p.dh0) K.backward_product(step_args(steps[s], r0), pb0, pb1);
          if (s > sg.s0) K.backward_point(proj_args(steps[s - 1], r0), pb0, pb1);
          team.barrier();
        }
      }
      // Weight and bias gradients of the segment's rows, in tasks of wt rows
      // of one gate block of dW_ih or of dW_hh (with that block's bias
      // gradient) over one of kc chunks of the rows. Chunk 0 adds to the sums
      // of the later segments; chunk c > 0 sets its partial sums, which are
      // added after the dx tasks, in the order of c (WeightTasks).
      for (int64_t task = tid; task < dw_tasks; task += nt) {
        const int64_t c = task % kc, blk = task / kc;
        const bool hh = blk >= G * per_gate;
        const int64_t g = blk % (G * per_gate) / per_gate, k0 = blk % per_gate * wt;
        const int64_t k1 = std::min(H, k0 + wt);
        int64_t a, b;
        split(rows, int(kc), int(c), &a, &b);
        const S* dg = (hh ? dgh : dgx.data()) + a * GHp + g * Hp + k0;
        const S beta = c == 0 ? zero_or_add : S(0);
        S* dw_out = c == 0 ? (hh ? p.dw_hh : p.dw_ih) : part_w(hh, c);
        S* db_out = c == 0 ? (hh ? p.db_hh : p.db_ih) : part_b(hh, c);
        if (hh)
          product(true, k1 - k0, P, b - a, dg, GHp, saved(cache.hprev, hprev_r, Pp, r0) + a * Pp,
                  Pp, beta, dw_out + (g * H + k0) * P, P);
        else
          product(true, k1 - k0, I, b - a, dg, GHp, cache.x.data() + (r0 + a) * I, I, beta,
                  dw_out + (g * H + k0) * I, I);
        if (!hh || !same_bias_grad)
          add_column_sums(db_out + g * H + k0, beta == S(0), dg, b - a, k1 - k0, GHp);
      }
      // Projection weights: dW_hr = Σ dh'ᵀ m, in tasks of rows of W_hr.
      if (proj)
        for (int64_t k0 = tid * wt; k0 < P; k0 += nt * wt) {
          const int64_t k1 = std::min(P, k0 + wt);
          product(true, k1 - k0, H, rows, dproj.data() + k0, Pp, saved(cache.m, m_r, Hp, r0), Hp,
                  zero_or_add, p.dw_hr + k0 * H, H);
        }
      // Input gradient of the segment's rows, in the tasks of gemm_tasks
      // (none when it is not wanted).
      const GemmTasks dxt = gemm_tasks(p.dx ? rows : 0, I, GHp);
      S* dx_rows = !p.dx ? nullptr : direct_dx ? p.dx + r0 * I : dxp.data();
      auto scatter_dx = [&](int64_t a, int64_t b) {  // dx rows [a, b) to the user's layout
        for (int64_t r = r0 + a, t = time_of_row(sched, r0 + a); r < r0 + b; ++r) {
          while (r >= sched.offset[t] + sched.count[t]) ++t;
          copy_n(row_at(p.dx, bf, T, B, t, sched.perm[r - sched.offset[t]], I),
                 dxp.data() + (r - r0) * I, I);
        }
      };
      for (int64_t k = tid; k < dxt.count(); k += nt) {
        int64_t a, b, c0, c1;
        dxt.at(k, &a, &b, &c0, &c1);
        product(false, b - a, c1 - c0, GHp, dgx.data() + a * GHp, GHp, cache.w_ih_data() + c0, I,
                S(0), dx_rows + a * I + c0, I);
        if (!direct_dx && dxt.nc == 1) scatter_dx(a, b);
      }
      if (!direct_dx && dxt.nc > 1) {
        team.barrier();
        int64_t a, b;
        split(rows, nt, tid, &a, &b);
        scatter_dx(a, b);
      }
      // The partial weight and bias gradients of chunks 1 .. kc-1, added in that
      // order to chunk 0's: each thread its share of dW's rows.
      if (kc > 1) {
        team.barrier();
        int64_t o0, o1;
        split(G * H, nt, tid, &o0, &o1);
        for (int64_t c = 1; c < kc; ++c)
          for (bool hh : {false, true}) {
            const int64_t cols = hh ? P : I;
            add_to((hh ? p.dw_hh : p.dw_ih) + o0 * cols, part_w(hh, c) + o0 * cols,
                   (o1 - o0) * cols);
            if (!hh || !same_bias_grad)
              add_to((hh ? p.db_hh : p.db_ih) + o0, part_b(hh, c) + o0, o1 - o0);
          }
      }
      // The next segment overwrites the gate gradients and recomputed values.
      if (i > 0) team.barrier();
    }
  });

  if (same_bias_grad && !segs.empty()) copy_n(p.db_hh, p.db_ih, G * H);
  if (segs.empty()) {  // no step ran: the weights have no gradient
    std::fill(p.dw_ih, p.dw_ih + G * H * I, S(0));
    std::fill(p.dw_hh, p.dw_hh + G * H * P, S(0));
    std::fill(p.db_ih, p.db_ih + G * H, S(0));
    std::fill(p.db_hh, p.db_hh + G * H, S(0));
    if (proj) std::fill(p.dw_hr, p.dw_hr + P * H, S(0));
  }
  for (int64_t j = 0; j < B; ++j) {
    if (p.dh0) copy_n(p.dh0 + sched.perm[j] * P, dh.data() + j * Pp, P);
    if (C == Cell::Lstm && p.dc0) copy_n(p.dc0 + sched.perm[j] * H, dc.data() + j * Hp, H);
  }
}

// ---------------------------------------------------------------- dispatch

template <typename Fn>
auto dispatch_cell(Cell cell, Fn&& fn) {
  switch (cell) {
    case Cell::RnnTanh: return fn(std::integral_constant<Cell, Cell::RnnTanh>{});
    case Cell::RnnRelu: return fn(std::integral_constant<Cell, Cell::RnnRelu>{});
    case Cell::RnnSigmoid: return fn(std::integral_constant<Cell, Cell::RnnSigmoid>{});
    case Cell::Lstm: return fn(std::integral_constant<Cell, Cell::Lstm>{});
    case Cell::Gru: return fn(std::integral_constant<Cell, Cell::Gru>{});
    case Cell::Proj: break;
  }
  throw std::invalid_argument("unknown cell");
}

}  // namespace cpu

template <typename scalar_t>
std::unique_ptr<Cache<scalar_t>> forward(const ForwardParams<scalar_t>& p) {
  return cpu::dispatch_cell(p.cell, [&](auto c) {
    return cpu::forward_cell<decltype(c)::value, scalar_t>(p);
  });
}

template <typename scalar_t>
void backward(const Cache<scalar_t>& cache, const BackwardParams<scalar_t>& p) {
  cpu::dispatch_cell(cache.cell, [&](auto c) {
    cpu::backward_cell<decltype(c)::value, scalar_t>(cache, p);
  });
}

}  // namespace fusedrnn
