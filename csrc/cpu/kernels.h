// fusedrnn: the per-step CPU micro-kernels, one table per instruction set.
//
// Internal layout (shape legend in common.h). Hidden units are grouped in
// blocks of U = SIMD lanes; Hp = nub * U is H rounded up to whole blocks and
// every internal row is padded to it (padding lanes hold zeros in the weights
// and harmless finite values in the state, and are never written to user
// arrays):
//   state h, c, dh, dc            [B, Hp]
//   gx, gates, dgx, dgh           [rows, G*Hp]   gate g at columns [g*Hp, g*Hp + H)
//   forward panel of W_hh         [nub][K][G][U]     wp[u][k][g][v] = W_hh[g*H + u*U + v, k]
//   backward panel of W_hh        [nub][G*Hp][U]     wb[u][g*Hp + k][v] = W_hh[g*H + k, u*U + v]
// (K = H, or the projection size P for an LSTM with projection, whose step is
// two products: gates from h [.., P] with the cell's epilogue writing
// m = o*tanh(c') [.., Hp], then h' = m W_hrᵀ as the internal cell Proj.)
//   input-side bias bx            [nub][G][U]   b_ih + b_hh (gru's n gate: b_ih only)
//   gru's recurrent n bias bhn    [nub][U]
// Work is split between threads by unit blocks [ub0, ub1); a thread only
// writes the columns of its blocks, so one barrier per step suffices.
#pragma once

#include <cstdint>

#include "fusedrnn/common.h"

namespace fusedrnn {

template <typename S>
struct FwdStep {
  Cell cell;
  int64_t H, Hp, n;        // n: rows computed at this step (a prefix of the batch)
  const S* wp;             // forward panel of W_hh
  const S* w;              // or W_hh as stored, [G*H, ldw] row-major (forward_step_raw),
  int64_t ldw;             // nullptr: the panel
  const S* bx;             // [nub][G][U]
  const S* bhn;            // [nub][U] (gru), else nullptr
  const S* in;             // [n, ld_in] rows the tile multiplies (k < K): h, or m for Proj
  int64_t K, ld_in;
  const S* h;              // [n, Hp] state before the step
  S* h_next;               // [n, Hp] state after the step
  S* c;                    // [n, Hp] lstm cell state, updated in place; else nullptr
  S* gx;                   // [n, G*Hp] input projection; activated gates written back when save
  const uint8_t* valid;    // [n] mask of the step, or nullptr (all valid)
  S* y;                    // user output at this step: row j at y + perm[j] * y_stride
  int64_t y_stride;
  const int64_t* perm;     // [n] packed row -> batch row
  bool save;               // training: keep what backward needs
  S* hprev;                // [n, Hp] saved state before the step (save)
  S* extra;                // lstm [n, 2*Hp] (c, c'); gru [n, Hp] (hn) (save)
  S* scratch;              // this thread's [n, 2*G*U] partial sums (large K), or nullptr
  S* m;                    // lstm with projection: m = o*tanh(c') [n, Hp] is written
                           // instead of h_next, y and hprev (Proj writes those)
};

template <typename S>
struct BwdStep {
  Cell cell;
  int64_t H, Hp, n;
  const S* wb;             // backward panel of W_hh
  const S* w;              // or W_hh as stored, [G*K, ldw] row-major, ldw = the
  int64_t ldw;             // output units (raw product, B = 1); nullptr: the panel
  const S* gates;          // [n, G*Hp] saved activated gates of the step
  const S* extra;          // saved extra values of the step
  const S* hprev;          // [n, Hp] saved state before the step
  const uint8_t* valid;    // [n] or nullptr
  const S* dy;             // user dy at this step: row j at dy + perm[j] * dy_stride
  int64_t dy_stride;
  const int64_t* perm;
  S* dh;                   // [n, Hp] gradient w.r.t. the state
  S* dc;                   // [n, Hp] lstm, else nullptr
  S* dgx;                  // [n, G*Hp] gradient w.r.t. the input-side pre-activations
  S* dgh;                  // [n, G*Hp] w.r.t. the recurrent ones (== dgx unless gru)
  // The product: out[n, units] (+)= dgh[n, G*Kp] (k < K in each gate block) @ wb.
  int64_t G, K, Kp, ld_out;
  S* out;
  bool accumulate;         // add to out (dh) rather than overwrite it
};

template <typename S>
struct Kernels {
  const char* isa;
  int lanes;  // U
  // Pack unit blocks [ub0, ub1) of the forward / backward panel of a weight
  // w [G*Hr, K] (forward: output units Hr) / w [G*Hr, ncols] (backward:
  // output units ncols, each gate's Hr rows padded to Hrp).
  void (*pack_fwd)(const S* w, int64_t G, int64_t Hr, int64_t K, S* wp, int64_t ub0,
                   int64_t ub1);
  void (*pack_bwd)(const S* w, int64_t G, int64_t Hr, int64_t Hrp, int64_t ncols, S* wb,
                   int64_t ub0, int64_t ub1);
  // One forward step for unit blocks [ub0, ub1): gh = h W_hhᵀ in registers,
  // then the cell's pointwise math on the tile (biases, gx, nonlinearities,
  // state update, mask rule, output and saved values).
  void (*forward_step)(const FwdStep<S>& a, int64_t ub0, int64_t ub1);
  // Backward, pointwise half: dh += dy, then the cell's gradient for the
  // step's rows; dh becomes the direct part of the gradient w.r.t. the state
  // before the step.
  void (*backward_point)(const BwdStep<S>& a, int64_t ub0, int64_t ub1);
  // Backward, product half: out (+)= dgh W for the step's rows.
  void (*backward_product)(const BwdStep<S>& a, int64_t ub0, int64_t ub1);
  // The input projection of rows r < n for unit blocks [ub0, ub1):
  // out[r, g*Hp + u*U + v] = sum_k x[r*ldx + k] W[g*H + u*U + v, k], from the
  // forward panel wp of W [G*H, K] (K = I). Each value sums k in order, so it
  // does not depend on n, ub0, ub1 or the thread.
  void (*input_product)(const S* x, int64_t ldx, int64_t n, const S* wp, int64_t G, int64_t K,
                        S* out, int64_t Hp, int64_t ub0, int64_t ub1);
  // Whether layers use input_product rather than one BLAS GEMM (the
  // instruction sets whose tiles hold 24 accumulators; with AVX2's 12, LSTM
  // and GRU inference ran 13-27% slower than with OpenBLAS's GEMM).
  bool input_tiles;
  // out[r, j] = sum_k x[r, k] w[j, k] for r < n, j in [j0, j1), on w as
  // stored (no packing; for products of few rows). Each output's value does
  // not depend on j0, j1.
  void (*matmul_nt)(const S* x, int64_t ldx, int64_t n, const S* w, int64_t ldw, int64_t K,
                    S* out, int64_t ldo, int64_t j0, int64_t j1);
  // out[r, j] (+)= sum_k a[r*sr + k*sk] w[k*ldw + j] for r < n, j in [j0, j1),
  // on w as stored (no packing; for products of few rows or a few-row inner
  // dimension); accumulate: add to out. Each output sums k in order, so its
  // value does not depend on j0, j1.
  void (*matmul_nn)(const S* a, int64_t sr, int64_t sk, int64_t n, const S* w, int64_t ldw,
                    int64_t K, S* out, int64_t ldo, int64_t j0, int64_t j1, bool accumulate);
  // Benchmark probes (csrc/cpu/probe.cpp): iters rounds of 12 register
  // multiply-adds; one multiply-add pass over w[0 .. n).
  S (*probe_fma)(int64_t iters, S m);
  S (*probe_stream)(const S* w, int64_t n, S m);
};

// The kernels for this CPU (AVX-512, AVX2/FMA or the portable build), chosen
// once by CPU feature detection; FUSEDRNN_ISA=generic|avx2|avx512 picks a
// lower one (for tests). isa_name() says which is in use.
template <typename S>
const Kernels<S>& kernels();
const char* isa_name();

// The tables of each build (nullptr for one not compiled in).
template <typename S>
const Kernels<S>* kernels_generic();
template <typename S>
const Kernels<S>* kernels_avx2();
template <typename S>
const Kernels<S>* kernels_avx512();

}  // namespace fusedrnn
