// fusedrnn: per-step micro-kernels (see kernels.h for layouts), written once
// with vector extensions and compiled once per instruction set by
// kernels_generic.cpp, kernels_avx2.cpp and kernels_avx512.cpp.
//
// Forward tile: MR rows of h times NU unit blocks of W_hh's forward panel,
// all G gates of those units, accumulated in MR*NU*G vector registers over
// k = 0..H-1; then the cell's pointwise math runs on the registers (biases,
// gx, nonlinearities, state update, mask rule) and writes h', c', y and the
// values backward needs. Gate pre-activations never go to memory.
#pragma once

#include <algorithm>
#include <utility>

#include "kernels.h"
#include "simd.h"
#include "../cells/gru.h"
#include "../cells/lstm.h"
#include "../cells/rnn.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

constexpr int gates_c(Cell c) { return c == Cell::Lstm ? 4 : c == Cell::Gru ? 3 : 1; }

// Accumulator budget: MR * NU * G vectors, 12 of the 16 vector registers
// (AVX2 and narrower), 24 of AVX-512's 32: twice the rows per tile, so each
// weight vector loaded serves twice the multiply-adds.
constexpr int kAccumulators = FUSEDRNN_VBYTES == 64 ? 24 : 12;
// The k loop of a step's forward tiles runs in chunks whose part of the panel
// (NU unit blocks) takes at most kChunkBytes, the tiles' partial sums kept in
// between (forward_step): 16 KiB, so a chunk stays in L1 for every row tile of
// the step (AVX2 kernels on the 2-core Xeon, lstm B = 64, H = 512 forward:
// 1.06x the time unchunked). AVX-512's tiles have twice the rows per weight
// vector loaded; where a step has at least 4 row tiles (4 * MR rows) they read
// the panel from L2 faster than they store and reload partial sums between
// chunks (Xeon, 48 KiB L1, 2 MiB L2; forward unchunked against 16 KiB chunks:
// lstm B = 24 0.97x, B = 64, H = 512 0.96x, B = 128, H = 1024 0.97x, gru
// B = 32 and 64 0.96-0.98x, rnn_tanh B = 128 0.97x), so they take chunks of
// up to 256 KiB, which any AVX-512 CPU's L2 holds (lstm up to H = 1024 in
// one). Fewer rows keep 16 KiB: unchunked, lstm B = 8 (2 tiles) took 1.04x,
// rnn_tanh B = 32 (12 + 12 + 8 rows) 1.02-1.03x; lstm B = 12 and 16 0.99x,
// rnn_tanh B = 48 (4 tiles) 1.005x.
constexpr int64_t kChunkBytes = 16384;
constexpr int64_t kChunkBytesManyRows = FUSEDRNN_VBYTES == 64 ? 262144 : kChunkBytes;
constexpr int tile_mr(int G) {
  return (G == 4 ? 3 : G == 3 ? 4 : 6) * (kAccumulators / 12);
}
constexpr int tile_nu(int G, int mr) {
  return kAccumulators / (G * mr) < 1 ? 1
         : kAccumulators / (G * mr) > 8 ? 8
                                         : kAccumulators / (G * mr);
}

// ------------------------------------------------------------------ packing

#if defined(__AVX2__)
// Columns k .. k+7 of eight rows src[0..7] written as eight 8-float vectors
// (one per column, the rows in order) to dst, dst + stride, ...: an 8 x 8
// transpose in registers.
inline void transpose8(const float* const* src, int64_t k, float* dst, int64_t stride) {
  __m256 r[8], t[8], q[8];
  for (int v = 0; v < 8; ++v) r[v] = _mm256_loadu_ps(src[v] + k);
  for (int v = 0; v < 8; v += 2) {  // rows v, v+1 interleaved
    t[v] = _mm256_unpacklo_ps(r[v], r[v + 1]);
    t[v + 1] = _mm256_unpackhi_ps(r[v], r[v + 1]);
  }
  for (int v = 0; v < 8; v += 4) {  // four rows of columns c and c + 4, c = 0..3
    q[v] = _mm256_shuffle_ps(t[v], t[v + 2], _MM_SHUFFLE(1, 0, 1, 0));
    q[v + 1] = _mm256_shuffle_ps(t[v], t[v + 2], _MM_SHUFFLE(3, 2, 3, 2));
    q[v + 2] = _mm256_shuffle_ps(t[v + 1], t[v + 3], _MM_SHUFFLE(1, 0, 1, 0));
    q[v + 3] = _mm256_shuffle_ps(t[v + 1], t[v + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * stride, _mm256_permute2f128_ps(q[c], q[c + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * stride, _mm256_permute2f128_ps(q[c], q[c + 4], 0x31));
  }
}
#endif

template <typename S>
void pack_fwd(const S* w, int64_t G, int64_t Hr, int64_t K, S* wp, int64_t ub0, int64_t ub1) {
  constexpr int U = Vec<S>::L;
  // A U x K block of w (U rows, each contiguous over k) transposed into K x U:
  // k outer, so the U rows are read as U sequential streams and each k's U
  // values are written contiguously.
  for (int64_t u = ub0; u < ub1; ++u)
    for (int64_t g = 0; g < G; ++g) {
      S* dst = wp + (u * K * G + g) * U;
      const S* src[U];
      int valid = 0;  // rows of the block that exist (the last block may be partial)
      for (int v = 0; v < U; ++v)
        if (u * U + v < Hr) src[valid++] = w + (g * Hr + u * U + v) * K;
      int64_t k = 0;
#if defined(__AVX2__)
      // float: whole 8 x 8 blocks in registers (two side by side for AVX-512's
      // 16 lanes)
      if constexpr (U % 8 == 0 && sizeof(S) == 4)
        if (valid == U)
          for (; k + 8 <= K; k += 8)
            for (int v = 0; v < U; v += 8) transpose8(src + v, k, dst + k * G * U + v, G * U);
#endif
      for (; k < K; ++k) {
        S* d = dst + k * G * U;
        for (int v = 0; v < valid; ++v) d[v] = src[v][k];
        for (int v = valid; v < U; ++v) d[v] = S(0);
      }
    }
}

template <typename S>
void pack_bwd(const S* w, int64_t G, int64_t Hr, int64_t Hrp, int64_t ncols, S* wb, int64_t ub0,
              int64_t ub1) {
  constexpr int U = Vec<S>::L;
  for (int64_t u = ub0; u < ub1; ++u) {
    const int64_t units = ncols - u * U < U ? ncols - u * U : U;  // columns of the block that exist
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < Hrp; ++k) {
        S* dst = wb + (u * G * Hrp + g * Hrp + k) * U;
        if (k >= Hr) {  // padding rows
          store(dst, V<S>{});
          continue;
        }
        const S* src = w + (g * Hr + k) * ncols + u * U;  // row g*Hr + k, contiguous
        if (units == U) store(dst, load(src));
        else
          for (int v = 0; v < U; ++v) dst[v] = v < units ? src[v] : S(0);
      }
  }
}

// ------------------------------------------------------------------ forward

template <typename S>
inline void store_user(S* p, V<S> v, int lanes) {
  if (lanes == Vec<S>::L) store(p, v);
  else store_part(p, v, lanes);
}

// The pointwise half of a forward tile, for one row and one unit block.
template <Cell C, typename S>
FUSEDRNN_ALWAYS_INLINE void forward_epilogue(const FwdStep<S>& a, int64_t row, int64_t u,
                                             const V<S>* acc) {
  using M = VecMath<S>;
  using Vt = V<S>;
  constexpr int U = Vec<S>::L;
  constexpr int G = gates_c(C);
  const int64_t Hp = a.Hp, col = u * U;
  const int lanes = a.H - col < U ? int(a.H - col) : U;
  if (a.m) {  // lstm with projection: the state h is [.., P]; Proj handles h, y
    if (a.valid && !a.valid[row]) {  // masked step: c carried; m = 0 reaches no gradient
      store(a.m + row * Hp + col, Vt{});
      return;
    }
  } else {
    const Vt h = load(a.h + row * Hp + col);
    S* y = a.y + a.perm[row] * a.y_stride + col;
    if (a.save) store(a.hprev + row * Hp + col, h);
    if (a.valid && !a.valid[row]) {  // masked step: state carried, y = carried state
      store(a.h_next + row * Hp + col, h);
      store_user(y, h, lanes);
      return;
    }
  }
  // (Proj has no input projection and no bias.)
  S* gx = C == Cell::Proj ? nullptr : a.gx + row * G * Hp + col;
  const S* bx = C == Cell::Proj ? nullptr : a.bx + u * G * U;
  Vt h_new;
  if constexpr (C == Cell::Lstm) {
    using L = cell::Lstm<M>;
    const auto q = L::gates(acc[0] + load(gx) + load(bx), acc[1] + load(gx + Hp) + load(bx + U),
                            acc[2] + load(gx + 2 * Hp) + load(bx + 2 * U),
                            acc[3] + load(gx + 3 * Hp) + load(bx + 3 * U));
    S* c = a.c + row * Hp + col;
    const Vt c_old = load(c);
    const Vt c_new = L::forward(q, c_old, &h_new);
    store(c, c_new);
    if (a.save) {
      store(gx, q.i);
      store(gx + Hp, q.f);
      store(gx + 2 * Hp, q.g);
      store(gx + 3 * Hp, q.o);
      store(a.extra + row * 2 * Hp + col, c_old);
      store(a.extra + row * 2 * Hp + Hp + col, c_new);
    }
    if (a.m) {
      store(a.m + row * Hp + col, h_new);
      return;
    }
  } else if constexpr (C == Cell::Gru) {
    using R = cell::Gru<M>;
    const Vt h = load(a.h + row * Hp + col);
    const Vt hn = acc[2] + load(a.bhn + u * U);
    const auto q = R::gates(load(gx) + load(bx), load(gx + Hp) + load(bx + U),
                            load(gx + 2 * Hp) + load(bx + 2 * U), acc[0], acc[1], hn);
    h_new = R::forward(q, h);
    if (a.save) {
      store(gx, q.r);
      store(gx + Hp, q.z);
      store(gx + 2 * Hp, q.n);
      store(a.extra + row * Hp + col, hn);
    }
  } else if constexpr (C == Cell::Proj) {
    h_new = acc[0];
  } else {
    h_new = cell::Rnn<C, M>::forward(acc[0] + load(gx) + load(bx));
    if (a.save) store(gx, h_new);
  }
  store(a.h_next + row * Hp + col, h_new);
  store_user(a.y + a.perm[row] * a.y_stride + col, h_new, lanes);
}

// The epilogue's input projection (gx) and user output (y) of a tile's rows
// and unit blocks, requested before its k loop: for long sequences gx was
// written by the input GEMM long before (megabytes ago) and y is fresh
// memory, and the epilogue's loads from them otherwise wait on memory after
// the k loop, where nothing else is left to overlap them (rnn_tanh
// B = 64, H = 512: a sixth of the tile's time on the gx load).
template <int G, int MR, int NU, typename S>
FUSEDRNN_ALWAYS_INLINE void prefetch_epilogue(const FwdStep<S>& a, int64_t r0, int64_t u0) {
  constexpr int U = Vec<S>::L;
  for (int r = 0; r < MR; ++r) {  // (a tile's MR rows all exist, as for its epilogue)
    const S* gx = a.gx + (r0 + r) * G * a.Hp + u0 * U;
    for (int j = 0; j < NU; ++j)
      for (int g = 0; g < G; ++g) __builtin_prefetch(gx + g * a.Hp + j * U, 1, 3);
    if (a.m) continue;  // (projection: the epilogue writes m, not y)
    const S* y = a.y + a.perm[r0 + r] * a.y_stride + u0 * U;
    for (int j = 0; j < NU; ++j) __builtin_prefetch(y + j * U, 1, 3);
  }
}

// acc[r][j][g] += sum over k in [k0, k1) of in[r * ld + k] times the panel's
// vector g of unit block j at k (blocks `panel` values apart), k in order:
// the k loop of every tile (forward_tile, input_tile).
template <int G, int MR, int NU, typename S>
FUSEDRNN_ALWAYS_INLINE void tile_k_loop(V<S> (&acc)[MR][NU][G], const S* wp, int64_t panel,
                                        const S* in, int64_t ld, int64_t k0, int64_t k1) {
  using Vt = V<S>;
  constexpr int U = Vec<S>::L;
  for (int64_t k = k0; k < k1; ++k) {
    Vt w[NU][G];
    for (int j = 0; j < NU; ++j)
      for (int g = 0; g < G; ++g) w[j][g] = load(wp + j * panel + (k * G + g) * U);
    for (int r = 0; r < MR; ++r) {
      const Vt b = splat(in[r * ld + k]);
      for (int j = 0; j < NU; ++j)
        for (int g = 0; g < G; ++g) acc[r][j][g] += b * w[j][g];
    }
  }
}

// One tile over k in [k0, k1). part == nullptr: the whole k range in one
// pass. Otherwise part holds the tile's partial sums [MR][NU][G][U] between
// k chunks (H longer than a chunk: kChunkBytes); the epilogue runs
// after the last chunk.
template <Cell C, typename S, int MR, int NU>
void forward_tile(const FwdStep<S>& a, int64_t r0, int64_t u0, int64_t k0, int64_t k1, S* part) {
  using Vt = V<S>;
  constexpr int U = Vec<S>::L;
  constexpr int G = gates_c(C);
  const int64_t K = a.K, ld = a.ld_in, panel = K * G * U;
  Vt acc[MR][NU][G];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NU; ++j)
      for (int g = 0; g < G; ++g)
        acc[r][j][g] = part && k0 > 0 ? load(part + ((r * NU + j) * G + g) * U) : Vt{};
  if constexpr (C != Cell::Proj)
    if (!part || k1 == K) prefetch_epilogue<G, MR, NU>(a, r0, u0);
  tile_k_loop<G, MR, NU, S>(acc, a.wp + u0 * panel, panel, a.in + r0 * ld, ld, k0, k1);
  if (part && k1 < K) {
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NU; ++j)
        for (int g = 0; g < G; ++g) store(part + ((r * NU + j) * G + g) * U, acc[r][j][g]);
    return;
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NU; ++j) forward_epilogue<C, S>(a, r0 + r, u0 + j, acc[r][j]);
}

// ------------------------------------------------- products on raw weights
// A product on the weight as the caller stores it, row-major [outputs, K]:
// one vector accumulator per output over k (lane l sums k = l, l+U, ... in
// order), then a fixed tree over the lanes. Each output's sum is the same
// whichever block or thread computes it. No packing: for one row of h or x
// a pass over the weight is all the work there is, and a packed copy would
// cost a second pass per call.

// Lane sums of U vectors, in order: r[v] = the sum of a[v]'s lanes, by the
// same tree for every v (pairs, then pairs of pairs, ...). Each level sums the
// even and odd lanes of two vectors laid end to end.
template <typename Vt, size_t... I>
inline Vt evens(Vt x, Vt y, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, y, int(2 * I)...);
}
template <typename Vt, size_t... I>
inline Vt odds(Vt x, Vt y, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, y, int(2 * I + 1)...);
}
template <typename S>
inline V<S> lane_sums(V<S>* a) {
  constexpr int U = Vec<S>::L;
  const auto idx = std::make_index_sequence<size_t(U)>{};
  for (int n = U; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i)
      a[i] = evens(a[2 * i], a[2 * i + 1], idx) + odds(a[2 * i], a[2 * i + 1], idx);
  return a[0];
}

// r[v] = sum_k x[k] w[v * ldw + k] for v < valid (rows v >= valid are not
// read; their lanes are 0). Row by row, so the weight is read in address
// order: four accumulators per row (k in groups of 4U; lane l of
// accumulator j sums k = jU + l, jU + l + 4U, ...), then (a0 + a1) + (a2 + a3).
template <typename S>
inline V<S> dot_block(const S* w, int64_t ldw, int valid, const S* x, int64_t K) {
  using Vt = V<S>;
  constexpr int U = Vec<S>::L;
  Vt sum[U];
  for (int v = 0; v < U; ++v) {
    sum[v] = Vt{};
    if (v >= valid) continue;
    const S* row = w + v * ldw;
    Vt a0{}, a1{}, a2{}, a3{};
    int64_t k = 0;
    for (; k + 4 * U <= K; k += 4 * U) {
      a0 += load(row + k) * load(x + k);
      a1 += load(row + k + U) * load(x + k + U);
      a2 += load(row + k + 2 * U) * load(x + k + 2 * U);
      a3 += load(row + k + 3 * U) * load(x + k + 3 * U);
    }
    for (; k + U <= K; k += U) a0 += load(row + k) * load(x + k);
    if (k < K) a1 += load_part(row + k, int(K - k)) * load_part(x + k, int(K - k));
    sum[v] = (a0 + a1) + (a2 + a3);
  }
  return lane_sums<S>(sum);
}

// out[r, j] = sum_k x[r, k] w[j, k] for rows r < n and outputs j in [j0, j1).
template <typename S>
void matmul_nt(const S* x, int64_t ldx, int64_t n, const S* w, int64_t ldw, int64_t K, S* out,
               int64_t ldo, int64_t j0, int64_t j1) {
  constexpr int U = Vec<S>::L;
  for (int64_t j = j0; j < j1; j += U) {
    const int valid = j1 - j < U ? int(j1 - j) : U;
    for (int64_t r = 0; r < n; ++r) {  // the block's rows of w stay in L1 across rows
      const V<S> v = dot_block(w + j * ldw, ldw, valid, x + r * ldx, K);
      if (valid == U) store(out + r * ldo + j, v);
      else store_part(out + r * ldo + j, v, valid);
    }
  }
}

// out[.., NV vectors] (+)= sum_k a[k*sk] w[k*ldw + ..] for one row of out, the
// last vector with `last` lanes (U: whole). k in order, one multiply-add per
// k on each accumulator.
template <typename S, int NV>
inline void nn_tile(const S* a, int64_t sk, const S* w, int64_t ldw, int64_t K, S* out, int last,
                    bool accumulate) {
  using Vt = V<S>;
  constexpr int U = Vec<S>::L;
  auto ld = [&](const S* p, int v) {
    return v == NV - 1 && last < U ? load_part(p, last) : load(p);
  };
  Vt c[NV];
  for (int v = 0; v < NV; ++v) c[v] = accumulate ? ld(out + v * U, v) : Vt{};
  for (int64_t k = 0; k < K; ++k) {
    const Vt d = splat(a[k * sk]);
    const S* wk = w + k * ldw;
    for (int v = 0; v < NV; ++v) c[v] += d * ld(wk + v * U, v);
  }
  for (int v = 0; v < NV; ++v) {
    if (v == NV - 1 && last < U) store_part(out + v * U, c[v], last);
    else store(out + v * U, c[v]);
  }
}

template <typename S>
void matmul_nn(const S* a, int64_t sr, int64_t sk, int64_t n, const S* w, int64_t ldw, int64_t K,
               S* out, int64_t ldo, int64_t j0, int64_t j1, bool accumulate) {
  constexpr int U = Vec<S>::L, NV = 8;
  for (int64_t r = 0; r < n; ++r) {
    const S* ar = a + r * sr;
    S* o = out + r * ldo;
    int64_t j = j0;
    for (; j + NV * U <= j1; j += NV * U)
      nn_tile<S, NV>(ar, sk, w + j, ldw, K, o + j, U, accumulate);
    for (; j < j1; j += U)
      nn_tile<S, 1>(ar, sk, w + j, ldw, K, o + j, j1 - j < U ? int(j1 - j) : U, accumulate);
  }
}

// forward_step on the raw weight (a.w): the same epilogue, gate g of unit
// block u from rows g*H + u*U ... of a.w. Unit blocks in chunks, gates outer
// within a chunk, so each gate's rows are read as one run of memory.
template <Cell C, typename S>
void forward_step_raw(const FwdStep<S>& a, int64_t ub0, int64_t ub1) {
  constexpr int G = gates_c(C);
  constexpr int U = Vec<S>::L;
  constexpr int64_t CH = 16;  // unit blocks per chunk
  V<S> acc[CH][G];
  for (int64_t r = 0; r < a.n; ++r)
    for (int64_t u0 = ub0; u0 < ub1; u0 += CH) {
      const int64_t u1 = u0 + CH < ub1 ? u0 + CH : ub1;
      for (int g = 0; g < G; ++g)
        for (int64_t u = u0; u < u1; ++u) {
          const int valid = a.H - u * U < U ? int(a.H - u * U) : U;
          acc[u - u0][g] =
              dot_block(a.w + (g * a.H + u * U) * a.ldw, a.ldw, valid, a.in + r * a.ld_in, a.K);
        }
      for (int64_t u = u0; u < u1; ++u) forward_epilogue<C, S>(a, r, u, acc[u - u0]);
    }
}

// Unit blocks [ub0, ub1) for MR rows starting at r0, NU blocks at a time.
template <Cell C, typename S, int MR, int NU>
void forward_rows(const FwdStep<S>& a, int64_t r0, int64_t ub0, int64_t ub1, int64_t k0,
                  int64_t k1, S* part) {
  int64_t u = ub0;
  for (; u + NU <= ub1; u += NU) forward_tile<C, S, MR, NU>(a, r0, u, k0, k1, part);
  for (; u < ub1; ++u) forward_tile<C, S, MR, 1>(a, r0, u, k0, k1, part);
}

// forward_rows with a run-time row count mr <= MR; NU = 0 picks the widest
// tile that fits the register budget for mr rows.
template <Cell C, typename S, int MR, int NU>
void forward_rows_mr(const FwdStep<S>& a, int64_t r0, int64_t ub0, int64_t ub1, int mr,
                     int64_t k0, int64_t k1, S* part) {
  if constexpr (MR >= 1) {
    if (mr == MR) {
      constexpr int G = gates_c(C);
      forward_rows<C, S, MR, NU ? NU : tile_nu(G, MR)>(a, r0, ub0, ub1, k0, k1, part);
      return;
    }
    forward_rows_mr<C, S, MR - 1, NU>(a, r0, ub0, ub1, mr, k0, k1, part);
  }
}

template <Cell C, typename S>
void forward_step(const FwdStep<S>& a, int64_t ub0, int64_t ub1) {
  if (a.w) return forward_step_raw<C, S>(a, ub0, ub1);
  constexpr int G = gates_c(C);
  constexpr int U = Vec<S>::L;
  constexpr int MR = tile_mr(G), NU = tile_nu(G, MR);
  const int64_t n = a.n, H = a.K;  // H: the length of the product's k loop
  // A small step's input rows (the state, half of it written by the other
  // threads in the step before) are requested before the tiles start: the k
  // loop reads them one value at a time, and each line another core wrote
  // stalled it where it came (inference forward, T = 100, with up to 8 KiB of
  // rows: B = 1, H = 256 lstm, gru and rnn_tanh 0.95x the time, rnn_tanh
  // H = 512 0.94x, gru B = 8 0.97-0.99x).
  if (n * H * int64_t(sizeof(S)) <= 8192)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t k = 0; k < H; k += 64 / int64_t(sizeof(S)))
        __builtin_prefetch(a.in + r * a.ld_in + k, 0, 3);
  // k per chunk: NU panels' chunk (KC * G * U * NU values) in the chunk's bytes.
  const int64_t KC = (n >= 4 * MR ? kChunkBytesManyRows : kChunkBytes) /
                     (G * U * NU * int64_t(sizeof(S)));
  if (n < MR) {  // few rows: wider tiles keep enough independent accumulators
    forward_rows_mr<C, S, MR, 0>(a, 0, ub0, ub1, int(n), 0, H, nullptr);
    return;
  }
  // Unit blocks outer, k chunks, rows inner: a panel chunk is reused from
  // cache for every row of the step.
  static_assert(NU <= 2, "a tail chunk of unit blocks must be a single block");
  const bool chunked = H > KC && a.scratch;
  // chunks of equal length (a short last one would leave the epilogue's
  // prefetch no time: gru H = 512 was 170 + 170 + 170 + 2)
  const int64_t chunks = chunked ? (H + KC - 1) / KC : 1, kc = (H + chunks - 1) / chunks;
  for (int64_t u = ub0; u < ub1; u += NU) {
    const int64_t u1 = u + NU < ub1 ? u + NU : ub1;
    const int64_t nu = u1 - u;
    for (int64_t k0 = 0; k0 < H; k0 += kc) {
      const int64_t k1 = k0 + kc < H ? k0 + kc : H;
      int64_t r = 0;
      for (; r + MR <= n; r += MR)
        forward_rows<C, S, MR, NU>(a, r, u, u1, k0, k1,
                                   chunked ? a.scratch + r * nu * G * U : nullptr);
      if (r < n)
        forward_rows_mr<C, S, MR, NU>(a, r, u, u1, int(n - r), k0, k1,
                                      chunked ? a.scratch + r * nu * G * U : nullptr);
    }
  }
}

// --------------------------------------------------------- input projection
// out[r, g*Hp + u*U + v] = sum_k x[r*ldx + k] wp[u][k][g][v]: the input
// projection of rows r < n for unit blocks [ub0, ub1), on the forward panel
// of W_ih (K = I). A tile holds MR rows x NU blocks x G gates in registers
// over all of k, so each value sums k in order, whatever rows and blocks a
// call covers or which thread makes it.

template <int G, int MR, int NU, typename S>
void input_tile(const S* x, int64_t ldx, const S* wp, int64_t K, S* out, int64_t ldo,
                int64_t Hp) {
  using Vt = V<S>;
  constexpr int U = Vec<S>::L;
  const int64_t panel = K * G * U;
  Vt acc[MR][NU][G];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NU; ++j)
      for (int g = 0; g < G; ++g) acc[r][j][g] = Vt{};
  tile_k_loop<G, MR, NU, S>(acc, wp, panel, x, ldx, 0, K);
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NU; ++j)
      for (int g = 0; g < G; ++g) store(out + r * ldo + g * Hp + j * U, acc[r][j][g]);
}

// The first mr <= MR rows of x into those of out, unit blocks [ub0, ub1):
// NU blocks a tile (NU = 0: the widest the register budget allows for mr
// rows).
template <int G, int MR, int NU, typename S>
void input_rows(const S* x, int64_t ldx, int mr, const S* wp, int64_t K, S* out, int64_t ldo,
                int64_t Hp, int64_t ub0, int64_t ub1) {
  if constexpr (MR >= 1) {
    if (mr < MR) return input_rows<G, MR - 1, NU>(x, ldx, mr, wp, K, out, ldo, Hp, ub0, ub1);
    constexpr int U = Vec<S>::L, W = NU ? NU : tile_nu(G, MR);
    const int64_t panel = K * G * U;
    int64_t u = ub0;
    for (; u + W <= ub1; u += W)
      input_tile<G, MR, W>(x, ldx, wp + u * panel, K, out + u * U, ldo, Hp);
    for (; u < ub1; ++u) input_tile<G, MR, 1>(x, ldx, wp + u * panel, K, out + u * U, ldo, Hp);
  }
}

template <int G, typename S>
void input_product_g(const S* x, int64_t ldx, int64_t n, const S* wp, int64_t K, S* out,
                     int64_t Hp, int64_t ub0, int64_t ub1) {
  constexpr int MR = tile_mr(G), NU = tile_nu(G, MR);
  const int64_t ldo = G * Hp;
  // Unit blocks outer: a block's panel is read from further out once per
  // call and from L2 by every row tile; the call's rows of x (a few steps'
  // worth, see rnn_impl.h) stay in L2 meanwhile. (Rows in blocks of 256 KiB
  // of x, each reading every panel again, was 8% slower at LSTM B = 128,
  // I = H = 1024.)
  const int64_t full = n / MR * MR;
  for (int64_t u = ub0; u < ub1; u += NU) {
    const int64_t u1 = u + NU < ub1 ? u + NU : ub1;
    for (int64_t r = 0; r < full; r += MR)
      input_rows<G, MR, NU>(x + r * ldx, ldx, MR, wp, K, out + r * ldo, ldo, Hp, u, u1);
  }
  if (full < n)
    input_rows<G, MR, 0>(x + full * ldx, ldx, int(n - full), wp, K, out + full * ldo, ldo, Hp,
                         ub0, ub1);
}

template <typename S>
void input_product(const S* x, int64_t ldx, int64_t n, const S* wp, int64_t G, int64_t K,
                   S* out, int64_t Hp, int64_t ub0, int64_t ub1) {
  switch (G) {
    case 4: return input_product_g<4, S>(x, ldx, n, wp, K, out, Hp, ub0, ub1);
    case 3: return input_product_g<3, S>(x, ldx, n, wp, K, out, Hp, ub0, ub1);
    default: return input_product_g<1, S>(x, ldx, n, wp, K, out, Hp, ub0, ub1);
  }
}

// ------------------------------------------------------------------ backward

template <Cell C, typename S>
void backward_point(const BwdStep<S>& a, int64_t ub0, int64_t ub1) {
  using M = VecMath<S>;
  using Vt = V<S>;
  constexpr int U = Vec<S>::L;
  constexpr int G = gates_c(C);
  const int64_t Hp = a.Hp, GHp = G * Hp;
  for (int64_t j = 0; j < a.n; ++j) {
    const S* dy = a.dy ? a.dy + a.perm[j] * a.dy_stride : nullptr;
    const bool valid = !a.valid || a.valid[j];
    for (int64_t u = ub0; u < ub1; ++u) {
      const int64_t col = u * U;
      const int lanes = a.H - col < U ? int(a.H - col) : U;
      S* dhp = a.dh + j * Hp + col;
      Vt dh = load(dhp);
      if (dy) dh += lanes == U ? load(dy + col) : load_part(dy + col, lanes);
      S* dgx = a.dgx + j * GHp + col;
      S* dgh = a.dgh + j * GHp + col;
      if (!valid) {  // masked step: the gradient passes to the carried state
        store(dhp, dh);
        for (int g = 0; g < G; ++g) {
          store(dgx + g * Hp, Vt{});
          if (dgh != dgx) store(dgh + g * Hp, Vt{});
        }
        continue;
      }
      const S* q = C == Cell::Proj ? nullptr : a.gates + j * GHp + col;
      if constexpr (C == Cell::Lstm) {
        using L = cell::Lstm<M>;
        const typename L::Gates gates{load(q), load(q + Hp), load(q + 2 * Hp), load(q + 3 * Hp)};
        const S* e = a.extra + j * 2 * Hp + col;
        S* dcp = a.dc + j * Hp + col;
        typename L::Gates d;
        store(dcp, L::backward(gates, load(e), load(e + Hp), dh, load(dcp), &d));
        store(dgx, d.i);
        store(dgx + Hp, d.f);
        store(dgx + 2 * Hp, d.g);
        store(dgx + 3 * Hp, d.o);
        store(dhp, Vt{});
      } else if constexpr (C == Cell::Gru) {
        using R = cell::Gru<M>;
        const typename R::Gates gates{load(q), load(q + Hp), load(q + 2 * Hp)};
        typename R::Gates dx, dhh;
        const Vt direct = R::backward(gates, load(a.extra + j * Hp + col),
                                      load(a.hprev + j * Hp + col), dh, &dx, &dhh);
        store(dgx, dx.r);
        store(dgx + Hp, dx.z);
        store(dgx + 2 * Hp, dx.n);
        store(dgh, dhh.r);
        store(dgh + Hp, dhh.z);
        store(dgh + 2 * Hp, dhh.n);
        store(dhp, direct);
      } else if constexpr (C == Cell::Proj) {  // h' = W_hr m: dgx is dh' itself
        store(dgx, dh);
        store(dhp, Vt{});
      } else {
        store(dgx, cell::Rnn<C, M>::backward(dh, load(q)));
        store(dhp, Vt{});
      }
    }
  }
}

// out[r0 .. r0+MR, blocks u0 .. u0+NU] (+)= dgh rows @ W (backward panel).
template <typename S, int MR, int NU>
void backward_tile(const BwdStep<S>& a, int64_t G, int64_t r0, int64_t u0) {
  using Vt = V<S>;
  constexpr int U = Vec<S>::L;
  const int64_t K = a.K, Kp = a.Kp, GKp = G * Kp, panel = GKp * U, ld = a.ld_out;
  Vt acc[MR][NU];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NU; ++j)
      acc[r][j] = a.accumulate ? load(a.out + (r0 + r) * ld + (u0 + j) * U) : Vt{};
  const S* wb = a.wb + u0 * panel;
  const S* dg = a.dgh + r0 * GKp;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k = g * Kp; k < g * Kp + K; ++k) {
      Vt w[NU];
      for (int j = 0; j < NU; ++j) w[j] = load(wb + j * panel + k * U);
      for (int r = 0; r < MR; ++r) {
        const Vt d = splat(dg[r * GKp + k]);
        for (int j = 0; j < NU; ++j) acc[r][j] += d * w[j];
      }
    }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NU; ++j) store(a.out + (r0 + r) * ld + (u0 + j) * U, acc[r][j]);
}

template <typename S, int MR, int NU>
void backward_rows(const BwdStep<S>& a, int64_t G, int64_t r0, int64_t ub0, int64_t ub1) {
  int64_t u = ub0;
  for (; u + NU <= ub1; u += NU) backward_tile<S, MR, NU>(a, G, r0, u);
  for (; u < ub1; ++u) backward_tile<S, MR, 1>(a, G, r0, u);
}

// backward_rows with a run-time row count mr <= MR; NU = 0 picks the widest
// tile that fits the register budget for mr rows.
template <typename S, int MR, int NU>
void backward_rows_mr(const BwdStep<S>& a, int64_t G, int64_t r0, int64_t ub0, int64_t ub1,
                      int mr) {
  if constexpr (MR >= 1) {
    if (mr == MR) {
      backward_rows<S, MR, NU ? NU : tile_nu(1, MR)>(a, G, r0, ub0, ub1);
      return;
    }
    backward_rows_mr<S, MR - 1, NU>(a, G, r0, ub0, ub1, mr);
  }
}

// The rows are cut into groups of equal size (at most MR): 8 rows run as
// 4 + 4, not as 6 + a 2-row tail of narrow tiles.
template <typename S>
void backward_product(const BwdStep<S>& a, int64_t ub0, int64_t ub1) {
  const int64_t G = a.G;
  if (a.w) {  // W as stored: gate by gate, columns [ub0*U, ub1*U) that exist
    constexpr int U = Vec<S>::L;
    if (ub0 >= ub1) return;
    const int64_t c0 = ub0 * U, c1 = ub1 * U < a.ldw ? ub1 * U : a.ldw, GKp = G * a.Kp;
    for (int64_t g = 0; g < G; ++g)
      matmul_nn<S>(a.dgh + g * a.Kp, GKp, 1, a.n, a.w + g * a.K * a.ldw, a.ldw, a.K, a.out,
                   a.ld_out, c0, c1, a.accumulate || g > 0);
    if (!a.accumulate)  // padding lanes: zeros, as the panel's zero columns give
      for (int64_t r = 0; r < a.n; ++r)
        std::fill(a.out + r * a.ld_out + c1, a.out + r * a.ld_out + ub1 * U, S(0));
    return;
  }
  constexpr int MR = tile_mr(1), NU = tile_nu(1, MR);
  const int64_t n = a.n, groups = (n + MR - 1) / MR;
  if (groups <= 2) {  // each group with the widest tile its row count allows
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r0 = n * g / groups, r1 = n * (g + 1) / groups;
      backward_rows_mr<S, MR, 0>(a, G, r0, ub0, ub1, int(r1 - r0));
    }
    return;
  }
  // Unit blocks outer, NU at a time, so their panel is reused from cache by
  // every row group.
  for (int64_t u = ub0; u < ub1; u += NU) {
    const int64_t u1 = u + NU < ub1 ? u + NU : ub1;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r0 = n * g / groups, r1 = n * (g + 1) / groups;
      backward_rows_mr<S, MR, NU>(a, G, r0, u, u1, int(r1 - r0));
    }
  }
}

// ------------------------------------------------------------------ tables

template <typename S>
void forward_step_any(const FwdStep<S>& a, int64_t ub0, int64_t ub1) {
  switch (a.cell) {
    case Cell::RnnTanh: return forward_step<Cell::RnnTanh, S>(a, ub0, ub1);
    case Cell::RnnRelu: return forward_step<Cell::RnnRelu, S>(a, ub0, ub1);
    case Cell::RnnSigmoid: return forward_step<Cell::RnnSigmoid, S>(a, ub0, ub1);
    case Cell::Lstm: return forward_step<Cell::Lstm, S>(a, ub0, ub1);
    case Cell::Gru: return forward_step<Cell::Gru, S>(a, ub0, ub1);
    case Cell::Proj: return forward_step<Cell::Proj, S>(a, ub0, ub1);
  }
}

template <typename S>
void backward_point_any(const BwdStep<S>& a, int64_t ub0, int64_t ub1) {
  switch (a.cell) {
    case Cell::RnnTanh: return backward_point<Cell::RnnTanh, S>(a, ub0, ub1);
    case Cell::RnnRelu: return backward_point<Cell::RnnRelu, S>(a, ub0, ub1);
    case Cell::RnnSigmoid: return backward_point<Cell::RnnSigmoid, S>(a, ub0, ub1);
    case Cell::Lstm: return backward_point<Cell::Lstm, S>(a, ub0, ub1);
    case Cell::Gru: return backward_point<Cell::Gru, S>(a, ub0, ub1);
    case Cell::Proj: return backward_point<Cell::Proj, S>(a, ub0, ub1);
  }
}

// ------------------------------------------------------------------ probes
// Machine ceilings for the benchmark (csrc/cpu/probe.cpp); the layers never
// call these.

// iters rounds of 12 independent multiply-adds on registers (the forward
// tile's accumulator count): the instruction set's multiply-add peak. Returns
// a value that depends on every one of them, so none is optimized away.
template <typename S>
S probe_fma(int64_t iters, S m) {
  using Vt = V<S>;
  Vt acc[12];
  for (int j = 0; j < 12; ++j) acc[j] = splat(S(j + 1) * S(1e-3));
  const Vt vm = splat(m), vb = splat(S(1e-6));
  for (int64_t i = 0; i < iters; ++i)
    for (int j = 0; j < 12; ++j) acc[j] = acc[j] * vm + vb;
  Vt t = acc[0];
  for (int j = 1; j < 12; ++j) t += acc[j];
  S s = 0;
  for (int l = 0; l < Vec<S>::L; ++l) s += t[l];
  return s;
}

// One pass over w[0 .. n), one multiply-add per value, as a step of the
// recurrence at batch 1 reads its part of W_hh; returns a value that depends
// on every one of them.
template <typename S>
S probe_stream(const S* w, int64_t n, S m) {
  using Vt = V<S>;
  constexpr int U = Vec<S>::L;
  Vt acc[8] = {};
  const Vt vm = splat(m);
  int64_t i = 0;
  for (; i + 8 * U <= n; i += 8 * U)
    for (int j = 0; j < 8; ++j) acc[j] += load(w + i + j * U) * vm;
  S s = 0;
  for (; i < n; ++i) s += w[i] * m;
  for (int j = 0; j < 8; ++j)
    for (int l = 0; l < U; ++l) s += acc[j][l];
  return s;
}

template <typename S>
const Kernels<S>* table() {
  static const Kernels<S> k{FUSEDRNN_ISA_NAME, Vec<S>::L, pack_fwd<S>, pack_bwd<S>,
                            forward_step_any<S>, backward_point_any<S>, backward_product<S>,
                            input_product<S>, kAccumulators >= 24, matmul_nt<S>, matmul_nn<S>,
                            probe_fma<S>, probe_stream<S>};
  return &k;
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
