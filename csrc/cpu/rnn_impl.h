// fusedrnn: CPU recurrence drivers (forward and backward through time).
//
// Included by one translation unit per dtype (rnn_f32.cpp, rnn_f64.cpp), which
// instantiate forward<scalar_t> and backward<scalar_t>.
//
// Forward, per call:
//   1. gather the valid input rows into row-packed order (skipped when the
//      input is already time-major and every row is valid);
//   2. gx[N, G*H] = x W_ihᵀ, one GEMM over all steps;
//   3. per step t (in processing order): gh[n_t, G*H] = h W_hhᵀ for the n_t
//      rows valid at t, then the cell's pointwise math (biases, gx add,
//      nonlinearities, state update, mask rule) row by row;
// Backward walks the steps in the opposite order: fused pointwise gradient,
// then dh_prev += dgh W_hh; after the loop dW_ih, dW_hh and dx are single
// GEMMs over all steps and the bias gradients column sums.
#pragma once

#include <algorithm>
#include <cstring>
#include <numeric>

#include "../cells/gru.h"
#include "../cells/lstm.h"
#include "../cells/rnn.h"
#include "fusedrnn/blas.h"
#include "fusedrnn/rnn.h"

namespace fusedrnn {
namespace cpu {

// Address of row (t, b) in a [T, B, W] (or [B, T, W] when batch_first) array.
template <typename P>
inline P* row_at(P* base, bool batch_first, int64_t T, int64_t B, int64_t t, int64_t b,
                 int64_t W) {
  const int64_t r = batch_first ? b * T + t : t * B + b;
  return base + r * W;
}

// Calls fn(t) for every time step in processing order.
template <typename Fn>
inline void for_each_step(int64_t T, bool reverse, Fn&& fn) {
  for (int64_t s = 0; s < T; ++s) fn(reverse ? T - 1 - s : s);
}

template <typename scalar_t>
void copy_row(scalar_t* dst, const scalar_t* src, int64_t n) {
  std::memcpy(dst, src, size_t(n) * sizeof(scalar_t));
}

// ---------------------------------------------------------------- forward

// Pointwise step for n rows. gx: [n, G*H] rows of this step (overwritten with
// the activated gates when saving); gh: [n, G*H]; h, c: [n, H] state, updated
// in place; extra: lstm [n, 2H] / gru [n, H] saved values (or nullptr).
template <Cell C, typename scalar_t>
void pointwise_forward(int64_t n, int64_t H, scalar_t* gx, const scalar_t* gh,
                       const scalar_t* b_ih, const scalar_t* b_hh, scalar_t* h, scalar_t* c,
                       scalar_t* extra, const uint8_t* valid, bool save) {
  const int64_t GH = gates_of(C) * H;
  for (int64_t j = 0; j < n; ++j) {
    if (valid && !valid[j]) continue;  // masked step: state carried unchanged
    scalar_t* gxr = gx + j * GH;
    const scalar_t* ghr = gh + j * GH;
    scalar_t* hr = h + j * H;
    if constexpr (C == Cell::Lstm) {
      scalar_t* cr = c + j * H;
      scalar_t* er = save ? extra + j * 2 * H : nullptr;
      for (int64_t k = 0; k < H; ++k) {
        const auto q = cell::lstm_gates<scalar_t>(
            gxr[k] + b_ih[k] + ghr[k] + b_hh[k],
            gxr[H + k] + b_ih[H + k] + ghr[H + k] + b_hh[H + k],
            gxr[2 * H + k] + b_ih[2 * H + k] + ghr[2 * H + k] + b_hh[2 * H + k],
            gxr[3 * H + k] + b_ih[3 * H + k] + ghr[3 * H + k] + b_hh[3 * H + k]);
        const scalar_t c_new = cell::lstm_forward(q, cr[k], &hr[k]);
        if (save) {
          gxr[k] = q.i;
          gxr[H + k] = q.f;
          gxr[2 * H + k] = q.g;
          gxr[3 * H + k] = q.o;
          er[k] = cr[k];
          er[H + k] = c_new;
        }
        cr[k] = c_new;
      }
    } else if constexpr (C == Cell::Gru) {
      scalar_t* er = save ? extra + j * H : nullptr;
      for (int64_t k = 0; k < H; ++k) {
        const scalar_t hn = ghr[2 * H + k] + b_hh[2 * H + k];
        const auto q = cell::gru_gates<scalar_t>(
            gxr[k] + b_ih[k], gxr[H + k] + b_ih[H + k], gxr[2 * H + k] + b_ih[2 * H + k],
            ghr[k] + b_hh[k], ghr[H + k] + b_hh[H + k], hn);
        hr[k] = cell::gru_forward(q, hr[k]);
        if (save) {
          gxr[k] = q.r;
          gxr[H + k] = q.z;
          gxr[2 * H + k] = q.n;
          er[k] = hn;
        }
      }
    } else {
      for (int64_t k = 0; k < H; ++k) {
        const scalar_t hn = cell::rnn_act<C>(gxr[k] + b_ih[k] + ghr[k] + b_hh[k]);
        hr[k] = hn;
        if (save) gxr[k] = hn;
      }
    }
  }
}

template <Cell C, typename scalar_t>
std::unique_ptr<Cache<scalar_t>> forward_cell(const ForwardParams<scalar_t>& p) {
  const int64_t T = p.T, B = p.B, I = p.I, H = p.H, G = gates_of(C), GH = G * H;
  const bool lstm = C == Cell::Lstm, gru = C == Cell::Gru;

  Schedule sched;
  sched.build(T, B, p.lengths);
  const int64_t N = sched.N;
  // x can feed the input GEMM as it is when it is time-major and every step
  // is valid; otherwise its rows are gathered, and masked-out rows zeroed so
  // that whatever they hold (NaN for missing data) reaches no gradient.
  const bool direct_x = sched.identity && !p.batch_first && !p.mask;

  std::unique_ptr<Cache<scalar_t>> cache;
  Buffer<scalar_t> x_tmp, gx_tmp;
  scalar_t *xp, *gx;
  if (p.training) {
    cache = std::make_unique<Cache<scalar_t>>();
    cache->x.resize(checked_mul(N, I));
    cache->hprev.resize(checked_mul(N, H));
    cache->gates.resize(checked_mul(N, GH));
    if (lstm) cache->extra.resize(checked_mul(N, 2 * H));
    if (gru) cache->extra.resize(checked_mul(N, H));
    cache->w_ih.resize(checked_mul(GH, I));
    cache->w_hh.resize(checked_mul(GH, H));
    xp = cache->x.data();
    gx = cache->gates.data();
  } else {
    if (!direct_x) x_tmp.resize(checked_mul(N, I));
    gx_tmp.resize(checked_mul(N, GH));
    xp = direct_x ? const_cast<scalar_t*>(p.x) : x_tmp.data();
    gx = gx_tmp.data();
  }

  // 1. input rows in packed order
  if (direct_x) {
    if (p.training && N) copy_row(xp, p.x, N * I);
  } else {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < sched.count[t]; ++j) {
        scalar_t* dst = xp + (sched.offset[t] + j) * I;
        if (p.mask && !p.mask[t * B + j])
          std::fill(dst, dst + I, scalar_t(0));
        else
          copy_row(dst, row_at(p.x, p.batch_first, T, B, t, sched.perm[j], I), I);
      }
  }

  // 2. input projection of every step at once
  gemm<scalar_t>(false, true, N, GH, I, 1, xp, I, p.w_ih, I, 0, gx, GH);

  // state in packed row order
  Buffer<scalar_t> h(checked_mul(B, H)), c(lstm ? checked_mul(B, H) : 0),
      gh(checked_mul(B, GH));
  for (int64_t j = 0; j < B; ++j) {
    copy_row(h.data() + j * H, p.h0 + sched.perm[j] * H, H);
    if (lstm) copy_row(c.data() + j * H, p.c0 + sched.perm[j] * H, H);
  }
  std::vector<uint8_t> valid;
  if (p.mask) valid.resize(size_t(B));

  // 3. the recurrence
  for_each_step(T, p.reverse, [&](int64_t t) {
    const int64_t n = sched.count[t], off = sched.offset[t];
    if (n == 0) return;
    if (p.training) {
      copy_row(cache->hprev.data() + off * H, h.data(), n * H);
    }
    gemm<scalar_t>(false, true, n, GH, H, 1, h.data(), H, p.w_hh, H, 0, gh.data(), GH);
    if (p.mask)
      for (int64_t j = 0; j < n; ++j) valid[j] = p.mask[t * B + j];  // identity order with mask
    scalar_t* extra = nullptr;
    if (p.training && lstm) extra = cache->extra.data() + off * 2 * H;
    if (p.training && gru) extra = cache->extra.data() + off * H;
    pointwise_forward<C, scalar_t>(n, H, gx + off * GH, gh.data(), p.b_ih, p.b_hh, h.data(),
                                   lstm ? c.data() : nullptr, extra,
                                   p.mask ? valid.data() : nullptr, p.training);
    for (int64_t j = 0; j < n; ++j)
      copy_row(row_at(p.y, p.batch_first, T, B, t, sched.perm[j], H), h.data() + j * H, H);
  });

  for (int64_t j = 0; j < B; ++j) {
    copy_row(p.h_n + sched.perm[j] * H, h.data() + j * H, H);
    if (lstm) copy_row(p.c_n + sched.perm[j] * H, c.data() + j * H, H);
  }

  if (cache) {
    cache->cell = C;
    cache->T = T;
    cache->B = B;
    cache->I = I;
    cache->H = H;
    cache->G = G;
    cache->reverse = p.reverse;
    cache->batch_first = p.batch_first;
    cache->has_lengths = p.lengths != nullptr;
    if (p.mask) cache->mask.assign(p.mask, p.mask + T * B);
    copy_row(cache->w_ih.data(), p.w_ih, GH * I);
    copy_row(cache->w_hh.data(), p.w_hh, GH * H);
    cache->sched = std::move(sched);
  }
  return cache;
}

// ---------------------------------------------------------------- backward

// Pointwise gradient for the n rows of one step. dh, dc: [n, H] gradients
// w.r.t. the state after the step, replaced by the direct part of the
// gradients w.r.t. the state before it (the recurrent product adds the rest).
// dgx, dgh: [n, G*H] gradients w.r.t. the input and recurrent pre-activations
// (the same buffer unless gru).
template <Cell C, typename scalar_t>
void pointwise_backward(int64_t n, int64_t H, const scalar_t* gates, const scalar_t* extra,
                        const scalar_t* hprev, scalar_t* dh, scalar_t* dc, scalar_t* dgx,
                        scalar_t* dgh, const uint8_t* valid) {
  const int64_t GH = gates_of(C) * H;
  for (int64_t j = 0; j < n; ++j) {
    scalar_t* dgxr = dgx + j * GH;
    scalar_t* dghr = dgh + j * GH;
    if (valid && !valid[j]) {  // masked step: the state's gradient passes through
      std::fill(dgxr, dgxr + GH, scalar_t(0));
      if (dghr != dgxr) std::fill(dghr, dghr + GH, scalar_t(0));
      continue;
    }
    const scalar_t* gr = gates + j * GH;
    scalar_t* dhr = dh + j * H;
    if constexpr (C == Cell::Lstm) {
      const scalar_t* er = extra + j * 2 * H;
      scalar_t* dcr = dc + j * H;
      for (int64_t k = 0; k < H; ++k) {
        const cell::LstmGates<scalar_t> q{gr[k], gr[H + k], gr[2 * H + k], gr[3 * H + k]};
        cell::LstmGates<scalar_t> d;
        dcr[k] = cell::lstm_backward(q, er[k], er[H + k], dhr[k], dcr[k], &d);
        dgxr[k] = d.i;
        dgxr[H + k] = d.f;
        dgxr[2 * H + k] = d.g;
        dgxr[3 * H + k] = d.o;
        dhr[k] = 0;
      }
    } else if constexpr (C == Cell::Gru) {
      const scalar_t* er = extra + j * H;
      const scalar_t* hp = hprev + j * H;
      for (int64_t k = 0; k < H; ++k) {
        const cell::GruGates<scalar_t> q{gr[k], gr[H + k], gr[2 * H + k]};
        cell::GruGates<scalar_t> dx, dhh;
        dhr[k] = cell::gru_backward(q, er[k], hp[k], dhr[k], &dx, &dhh);
        dgxr[k] = dx.r;
        dgxr[H + k] = dx.z;
        dgxr[2 * H + k] = dx.n;
        dghr[k] = dhh.r;
        dghr[H + k] = dhh.z;
        dghr[2 * H + k] = dhh.n;
      }
    } else {
      for (int64_t k = 0; k < H; ++k) {
        dgxr[k] = cell::rnn_backward<C>(dhr[k], gr[k]);
        dhr[k] = 0;
      }
    }
  }
}

// out[W] = sum over rows of a[rows, W] (fixed order: deterministic).
template <typename scalar_t>
void column_sums(const scalar_t* a, int64_t rows, int64_t W, scalar_t* out) {
  std::fill(out, out + W, scalar_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* ar = a + r * W;
    for (int64_t k = 0; k < W; ++k) out[k] += ar[k];
  }
}

template <Cell C, typename scalar_t>
void backward_cell(const Cache<scalar_t>& cache, const BackwardParams<scalar_t>& p) {
  const int64_t T = cache.T, B = cache.B, I = cache.I, H = cache.H, GH = cache.G * H;
  const bool lstm = C == Cell::Lstm, gru = C == Cell::Gru;
  const Schedule& sched = cache.sched;
  const int64_t N = sched.N;
  const bool bf = cache.batch_first;
  const bool has_mask = !cache.mask.empty();

  Buffer<scalar_t> dgx(checked_mul(N, GH)), dgh_own(gru ? checked_mul(N, GH) : 0);
  scalar_t* dgh = gru ? dgh_own.data() : dgx.data();
  Buffer<scalar_t> dh(checked_mul(B, H)), dc(lstm ? checked_mul(B, H) : 0);
  for (int64_t j = 0; j < B; ++j) {
    copy_row(dh.data() + j * H, p.dh_n + sched.perm[j] * H, H);
    if (lstm) copy_row(dc.data() + j * H, p.dc_n + sched.perm[j] * H, H);
  }
  std::vector<int64_t> order;
  order.reserve(size_t(T));
  for_each_step(T, cache.reverse, [&](int64_t t) { order.push_back(t); });

  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    const int64_t t = *it, n = sched.count[t], off = sched.offset[t];
    if (n == 0) continue;
    // y at this step is the new state (valid) or the carried one (masked):
    // either way its gradient joins the state's.
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* dyr = row_at(p.dy, bf, T, B, t, sched.perm[j], H);
      scalar_t* dhr = dh.data() + j * H;
      for (int64_t k = 0; k < H; ++k) dhr[k] += dyr[k];
    }
    const uint8_t* valid = has_mask ? cache.mask.data() + t * B : nullptr;
    pointwise_backward<C, scalar_t>(
        n, H, cache.gates.data() + off * GH,
        lstm ? cache.extra.data() + off * 2 * H : (gru ? cache.extra.data() + off * H : nullptr),
        cache.hprev.data() + off * H, dh.data(), lstm ? dc.data() : nullptr, dgx.data() + off * GH,
        dgh + off * GH, valid);
    gemm<scalar_t>(false, false, n, H, GH, 1, dgh + off * GH, GH, cache.w_hh.data(), H, 1,
                   dh.data(), H);
  }

  for (int64_t j = 0; j < B; ++j) {
    copy_row(p.dh0 + sched.perm[j] * H, dh.data() + j * H, H);
    if (lstm) copy_row(p.dc0 + sched.perm[j] * H, dc.data() + j * H, H);
  }

  // Weight, bias and input gradients over all steps at once.
  gemm<scalar_t>(true, false, GH, I, N, 1, dgx.data(), GH, cache.x.data(), I, 0, p.dw_ih, I);
  gemm<scalar_t>(true, false, GH, H, N, 1, dgh, GH, cache.hprev.data(), H, 0, p.dw_hh, H);
  column_sums(dgx.data(), N, GH, p.db_ih);
  column_sums(dgh, N, GH, p.db_hh);
  if (sched.identity && !bf) {
    gemm<scalar_t>(false, false, N, I, GH, 1, dgx.data(), GH, cache.w_ih.data(), I, 0, p.dx, I);
  } else {
    Buffer<scalar_t> dxp(checked_mul(N, I));
    gemm<scalar_t>(false, false, N, I, GH, 1, dgx.data(), GH, cache.w_ih.data(), I, 0,
                   dxp.data(), I);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < sched.count[t]; ++j)
        copy_row(row_at(p.dx, bf, T, B, t, sched.perm[j], I),
                 dxp.data() + (sched.offset[t] + j) * I, I);
  }
}

// ---------------------------------------------------------------- dispatch

template <typename scalar_t, typename Fn>
auto dispatch_cell(Cell cell, Fn&& fn) {
  switch (cell) {
    case Cell::RnnTanh: return fn(std::integral_constant<Cell, Cell::RnnTanh>{});
    case Cell::RnnRelu: return fn(std::integral_constant<Cell, Cell::RnnRelu>{});
    case Cell::RnnSigmoid: return fn(std::integral_constant<Cell, Cell::RnnSigmoid>{});
    case Cell::Lstm: return fn(std::integral_constant<Cell, Cell::Lstm>{});
    case Cell::Gru: return fn(std::integral_constant<Cell, Cell::Gru>{});
  }
  throw std::invalid_argument("unknown cell");
}

}  // namespace cpu

template <typename scalar_t>
std::unique_ptr<Cache<scalar_t>> forward(const ForwardParams<scalar_t>& p) {
  BlasThreadScope threads;
  return cpu::dispatch_cell<scalar_t>(p.cell, [&](auto c) {
    return cpu::forward_cell<decltype(c)::value, scalar_t>(p);
  });
}

template <typename scalar_t>
void backward(const Cache<scalar_t>& cache, const BackwardParams<scalar_t>& p) {
  BlasThreadScope threads;
  cpu::dispatch_cell<scalar_t>(cache.cell, [&](auto c) {
    cpu::backward_cell<decltype(c)::value, scalar_t>(cache, p);
  });
}

}  // namespace fusedrnn
