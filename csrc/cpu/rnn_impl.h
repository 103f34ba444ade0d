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
// repacking of the shared operand (W_ih for row tasks, x or h for weight
// tasks) stays small against the product, small enough for about 8 tasks.
inline int64_t task_size(int64_t total, int64_t lo, int64_t hi) {
  const int64_t t = (total / 8 + 63) / 64 * 64;
  return t < lo ? lo : t > hi ? hi : t;
}
inline int64_t row_task(int64_t N) { return task_size(N, 256, 1024); }           // rows of x, dx
inline int64_t weight_task(int64_t G, int64_t H) { return task_size(G * H, 64, 256); }  // of dW

// Time step of packed row r (the last t whose rows start at or before r).
inline int64_t time_of_row(const Schedule& s, int64_t r) {
  return int64_t(std::upper_bound(s.offset.begin(), s.offset.end(), r) - s.offset.begin()) - 1;
}

inline constexpr int gates_c(Cell c) { return c == Cell::Lstm ? 4 : c == Cell::Gru ? 3 : 1; }

// Threads for a layer: no more than unit blocks, and one when a step is so
// small that a barrier would cost more than the work it shares.
inline int choose_threads(int64_t nub, int64_t B, int64_t G, int64_t H) {
  int64_t n = get_num_threads();
  if (n > nub) n = nub;
  if (B * G * H * H < (int64_t(1) << 16)) n = 1;
  return n < 1 ? 1 : int(n);
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

  std::unique_ptr<Cache<S>> cache;
  Buffer<S> x_tmp, gx_tmp, w_ih_tmp;
  S *xp = nullptr, *gx;
  S* w_ih_pad = nullptr;  // W_ih with gate blocks padded to Hp rows
  if (p.training) {
    cache = std::make_unique<Cache<S>>();
    cache->x.resize(checked_mul(N, I));
    cache->hprev.resize(checked_mul(N, Pp));
    cache->gates.resize(checked_mul(N, GHp));
    cache->extra.resize(checked_mul(N, E));
    cache->w_ih.resize(checked_mul(GHp, I));
    cache->w_hh.resize(checked_mul(G * H, P));
    if (proj) {
      cache->m.resize(checked_mul(N, Hp));
      cache->w_hr.resize(checked_mul(P, H));
    }
    xp = cache->x.data();
    gx = cache->gates.data();
    w_ih_pad = cache->w_ih.data();
  } else {
    if (!direct_x) x_tmp.resize(checked_mul(N, I));
    xp = direct_x ? nullptr : x_tmp.data();
    gx_tmp.resize(checked_mul(N, GHp));
    gx = gx_tmp.data();
    if (Hp != H) {
      w_ih_tmp.resize(checked_mul(GHp, I));
      w_ih_pad = w_ih_tmp.data();
    }
  }
  const S* x_gemm = direct_x && !p.training ? p.x : xp;

  // W_ih with each gate block padded to Hp rows (kept for backward when
  // training); biases in the kernels' layout.
  if (w_ih_pad)
    for (int64_t g = 0; g < G; ++g) {
      copy_n(w_ih_pad + g * Hp * I, p.w_ih + g * H * I, H * I);
      std::fill(w_ih_pad + (g * Hp + H) * I, w_ih_pad + (g + 1) * Hp * I, S(0));
    }
  const S* w_ih_gemm = w_ih_pad ? w_ih_pad : p.w_ih;
  Buffer<S> bx(checked_mul(nub * G, U)), bhn(C == Cell::Gru ? checked_mul(nub, U) : 0);
  for (int64_t u = 0; u < nub; ++u)
    for (int64_t v = 0; v < U; ++v) {
      const int64_t unit = u * U + v;
      for (int64_t g = 0; g < G; ++g) {
        const bool hh = !(C == Cell::Gru && g == 2);  // gru's b_hn stays inside r*(...)
        bx.data()[(u * G + g) * U + v] =
            unit < H ? bias_at(p.b_ih, g * H + unit) + (hh ? bias_at(p.b_hh, g * H + unit) : S(0))
                     : S(0);
      }
      if (C == Cell::Gru) bhn.data()[u * U + v] = unit < H ? bias_at(p.b_hh, 2 * H + unit) : S(0);
    }

  Buffer<S> wp(checked_mul(checked_mul(nub, P), G * U));
  Buffer<S> hA(checked_mul(B, Pp)), hB(checked_mul(B, Pp));
  Buffer<S> c(C == Cell::Lstm ? checked_mul(B, Hp) : 0);
  copy_rows_padded(hA.data(), Pp, p.h0, P, sched.perm.data(), B);
  copy_n(hB.data(), hA.data(), B * Pp);
  // projection: its forward panel, and m = o*tanh(c') of a step when not training
  Buffer<S> wr(proj ? checked_mul(checked_mul(nubP, H), U) : 0);
  Buffer<S> m_step(proj && !p.training ? checked_mul(B, Hp) : 0);
  if (C == Cell::Lstm) copy_rows_padded(c.data(), Hp, p.c0, H, sched.perm.data(), B);

  std::vector<int64_t> steps;  // executed steps, in processing order
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.reverse ? T - 1 - s : s;
    if (sched.count[t] > 0) steps.push_back(t);
  }

  const int threads = choose_threads(std::max(nub, nubP), B, G, H);
  const int64_t scratch_per_thread = B * 2 * G * U;
  Buffer<S> scratch(checked_mul(threads, scratch_per_thread));

  ThreadPool::run(threads, [&](int tid, Team& team) {
    const int nt = team.size();
    int64_t ub0, ub1, pb0, pb1;
    split(nub, nt, tid, &ub0, &ub1);
    split(nubP, nt, tid, &pb0, &pb1);
    // 1. input rows and input projection, in row tasks
    const int64_t rt = row_task(N);
    for (int64_t r0 = tid * rt; r0 < N; r0 += nt * rt) {
      const int64_t r1 = std::min(N, r0 + rt);
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
      gemm<S>(false, true, r1 - r0, GHp, I, 1, x_gemm + r0 * I, I, w_ih_gemm, I, 0,
              gx + r0 * GHp, GHp);
    }
    // this thread's part of the W_hh (and W_hr) panels
    K.pack_fwd(p.w_hh, G, H, P, wp.data(), ub0, ub1);
    if (proj) K.pack_fwd(p.w_hr, 1, P, H, wr.data(), pb0, pb1);
    team.barrier();
    // 2. the recurrence
    S* h = hA.data();
    S* h_next = hB.data();
    for (const int64_t t : steps) {
      const int64_t off = sched.offset[t];
      FwdStep<S> a;
      a.cell = C;
      a.H = H;
      a.Hp = Hp;
      a.n = sched.count[t];
      a.wp = wp.data();
      a.bx = bx.data();
      a.bhn = bhn.data();
      a.in = h;
      a.K = P;
      a.ld_in = Pp;
      a.h = h;
      a.h_next = h_next;
      a.c = c.data();
      a.gx = gx + off * GHp;
      a.valid = p.mask ? reinterpret_cast<const uint8_t*>(p.mask + t * B) : nullptr;
      a.y = step_base(p.y, bf, T, B, t, P, &a.y_stride);
      a.perm = sched.perm.data();
      a.save = p.training;
      a.hprev = p.training ? cache->hprev.data() + off * Pp : nullptr;
      a.extra = p.training ? cache->extra.data() + off * E : nullptr;
      a.scratch = scratch.data() + tid * scratch_per_thread;
      a.m = !proj ? nullptr : p.training ? cache->m.data() + off * Hp : m_step.data();
      K.forward_step(a, ub0, ub1);
      team.barrier();
      if (proj) {  // h' = W_hr m, over the P units
        FwdStep<S> b = a;
        b.cell = Cell::Proj;
        b.H = P;
        b.Hp = Pp;
        b.wp = wr.data();
        b.bx = b.bhn = nullptr;
        b.in = a.m;
        b.K = H;
        b.ld_in = Hp;
        b.c = b.gx = b.extra = b.m = nullptr;
        K.forward_step(b, pb0, pb1);
        team.barrier();
      }
      std::swap(h, h_next);
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
    if (p.mask) cache->mask.assign(p.mask, p.mask + T * B);
    copy_n(cache->w_hh.data(), p.w_hh, G * H * P);
    if (proj) copy_n(cache->w_hr.data(), p.w_hr, P * H);
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
  const int64_t N = sched.N;
  const bool bf = cache.batch_first;
  const bool proj = C == Cell::Lstm && cache.w_hr.size() > 0;
  const int64_t P = cache.P, nubP = (P + U - 1) / U, Pp = cache.Pp;
  if (Hp != nub * U || Pp != nubP * U) throw std::logic_error("fusedrnn: cache from other kernels");

  Buffer<S> dgx(checked_mul(N, GHp)), dgh_own(C == Cell::Gru ? checked_mul(N, GHp) : 0);
  S* dgh = C == Cell::Gru ? dgh_own.data() : dgx.data();
  Buffer<S> dh(checked_mul(B, Pp)), dc(C == Cell::Lstm ? checked_mul(B, Hp) : 0);
  copy_rows_padded(dh.data(), Pp, p.dh_n, P, sched.perm.data(), B);
  if (C == Cell::Lstm) copy_rows_padded(dc.data(), Hp, p.dc_n, H, sched.perm.data(), B);
  // W_hh's backward panel: output units are the state's (P of them)
  Buffer<S> wb(checked_mul(checked_mul(nubP, GHp), U));
  // projection: W_hr's backward panel, dL/dh' of every step, dL/dm of a step
  Buffer<S> wrb(proj ? checked_mul(checked_mul(nub, Pp), U) : 0);
  Buffer<S> dproj(proj ? checked_mul(N, Pp) : 0), dm(proj ? checked_mul(B, Hp) : 0);
  const bool direct_dx = sched.identity && !bf;
  Buffer<S> dxp(direct_dx ? 0 : checked_mul(N, I));

  std::vector<int64_t> steps;  // executed steps, in forward processing order
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = cache.reverse ? T - 1 - s : s;
    if (sched.count[t] > 0) steps.push_back(t);
  }

  ThreadPool::run(choose_threads(std::max(nub, nubP), B, G, H), [&](int tid, Team& team) {
    const int nt = team.size();
    int64_t ub0, ub1, pb0, pb1;
    split(nub, nt, tid, &ub0, &ub1);
    split(nubP, nt, tid, &pb0, &pb1);
    auto step_args = [&](int64_t t) {
      const int64_t off = sched.offset[t];
      BwdStep<S> a;
      a.cell = C;
      a.H = H;
      a.Hp = Hp;
      a.n = sched.count[t];
      a.wb = wb.data();
      a.gates = cache.gates.data() + off * GHp;
      a.extra = cache.extra.data() + off * E;
      a.hprev = cache.hprev.data() + off * Hp;
      a.valid = cache.mask.empty() ? nullptr : cache.mask.data() + t * B;
      a.dy = p.dy ? step_base(p.dy, bf, T, B, t, H, &a.dy_stride) : nullptr;
      a.perm = sched.perm.data();
      a.dh = dh.data();
      a.dc = dc.data();
      a.dgx = dgx.data() + off * GHp;
      a.dgh = dgh + off * GHp;
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
    auto proj_args = [&](int64_t t) {
      const int64_t off = sched.offset[t];
      BwdStep<S> a{};
      a.cell = Cell::Proj;
      a.H = P;
      a.Hp = Pp;
      a.n = sched.count[t];
      a.wb = wrb.data();
      a.valid = cache.mask.empty() ? nullptr : cache.mask.data() + t * B;
      a.dy = p.dy ? step_base(p.dy, bf, T, B, t, P, &a.dy_stride) : nullptr;
      a.perm = sched.perm.data();
      a.dh = dh.data();
      a.dgx = a.dgh = dproj.data() + off * Pp;
      a.G = 1;
      a.K = P;
      a.Kp = Pp;
      a.out = dm.data();
      a.ld_out = Hp;
      a.accumulate = false;
      return a;
    };
    // Steps in reverse. The pointwise gradient of a step touches only this
    // thread's units; the product dh += dgh W_hh reads every unit's dgh. So
    // each thread runs product(s) then pointwise(s-1) on its units, and one
    // barrier per step separates them from the next product.
    K.pack_bwd(cache.w_hh.data(), G, H, Hp, P, wb.data(), pb0, pb1);
    if (!proj) {
      if (!steps.empty()) K.backward_point(step_args(steps.back()), ub0, ub1);
      team.barrier();
      for (size_t i = steps.size(); i-- > 0;) {
        K.backward_product(step_args(steps[i]), ub0, ub1);
        if (i > 0) K.backward_point(step_args(steps[i - 1]), ub0, ub1);
        team.barrier();
      }
    } else {
      // Per step: dh' (P units) | barrier | dm = dh' W_hr and the cell's point
      // gradient (H units) | barrier | dh = dgates W_hh (P units), then dh'
      // of the step before on the same units.
      K.pack_bwd(cache.w_hr.data(), 1, P, Pp, H, wrb.data(), ub0, ub1);
      if (!steps.empty()) K.backward_point(proj_args(steps.back()), pb0, pb1);
      team.barrier();
      for (size_t i = steps.size(); i-- > 0;) {
        K.backward_product(proj_args(steps[i]), ub0, ub1);
        K.backward_point(step_args(steps[i]), ub0, ub1);
        team.barrier();
        K.backward_product(step_args(steps[i]), pb0, pb1);
        if (i > 0) K.backward_point(proj_args(steps[i - 1]), pb0, pb1);
        team.barrier();
      }
    }
    // Weight and bias gradients, in tasks of wt rows of one gate block of
    // dW_ih or of dW_hh (with that block's bias gradient).
    const int64_t wt = weight_task(G, H), per_gate = (H + wt - 1) / wt;
    for (int64_t task = tid; task < 2 * G * per_gate; task += nt) {
      const bool hh = task >= G * per_gate;
      const int64_t g = task % (G * per_gate) / per_gate, k0 = task % per_gate * wt;
      const int64_t k1 = std::min(H, k0 + wt);
      const S* dg = (hh ? dgh : dgx.data()) + g * Hp + k0;
      if (hh)
        gemm<S>(true, false, k1 - k0, P, N, 1, dg, GHp, cache.hprev.data(), Pp, 0,
                p.dw_hh + (g * H + k0) * P, P);
      else
        gemm<S>(true, false, k1 - k0, I, N, 1, dg, GHp, cache.x.data(), I, 0,
                p.dw_ih + (g * H + k0) * I, I);
      S* db = (hh ? p.db_hh : p.db_ih) + g * H + k0;
      std::fill(db, db + (k1 - k0), S(0));
      for (int64_t r = 0; r < N; ++r)
        for (int64_t k = 0; k < k1 - k0; ++k) db[k] += dg[r * GHp + k];
    }
    // Projection weights: dW_hr = Σ dh'ᵀ m, in tasks of rows of W_hr.
    if (proj)
      for (int64_t k0 = tid * wt; k0 < P; k0 += nt * wt) {
        const int64_t k1 = std::min(P, k0 + wt);
        gemm<S>(true, false, k1 - k0, H, N, 1, dproj.data() + k0, Pp, cache.m.data(), Hp, 0,
                p.dw_hr + k0 * H, H);
      }
    // Input gradient, in row tasks.
    const int64_t rt = row_task(N);
    S* dx_rows = direct_dx ? p.dx : dxp.data();
    for (int64_t r0 = tid * rt; r0 < N; r0 += nt * rt) {
      const int64_t r1 = std::min(N, r0 + rt);
      gemm<S>(false, false, r1 - r0, I, GHp, 1, dgx.data() + r0 * GHp, GHp, cache.w_ih.data(),
              I, 0, dx_rows + r0 * I, I);
      if (!direct_dx)
        for (int64_t r = r0, t = time_of_row(sched, r0); r < r1; ++r) {
          while (r >= sched.offset[t] + sched.count[t]) ++t;
          copy_n(row_at(p.dx, bf, T, B, t, sched.perm[r - sched.offset[t]], I),
                 dxp.data() + r * I, I);
        }
    }
  });

  for (int64_t j = 0; j < B; ++j) {
    copy_n(p.dh0 + sched.perm[j] * P, dh.data() + j * Pp, P);
    if (C == Cell::Lstm) copy_n(p.dc0 + sched.perm[j] * H, dc.data() + j * Hp, H);
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
