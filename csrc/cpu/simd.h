// fusedrnn: SIMD vectors and vector math for one instruction set.
//
// Included only by kernels_impl.h, inside a translation unit that defines
//   FUSEDRNN_ISA_NS   a namespace name for this instruction set (generic, avx2, avx512)
//   FUSEDRNN_VBYTES   the vector width in bytes (16, 32, 64)
// and is compiled with the matching -m flags. Everything here lives in
// fusedrnn::FUSEDRNN_ISA_NS, so the variants never clash at link time.
//
// GCC/Clang vector extensions: the same source becomes SSE2, AVX2 or AVX-512.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if !defined(FUSEDRNN_ISA_NS) || !defined(FUSEDRNN_VBYTES)
#error "define FUSEDRNN_ISA_NS and FUSEDRNN_VBYTES before including simd.h"
#endif

// For the pointwise math of a step: gcc left VecMath<float>::tanh and the
// forward epilogue as calls (perf: about a quarter of an LSTM B = 8 forward's
// recurrence), each transcendental a serial chain the next could not overlap.
// Inlined, the recurrence of LSTM T = 100, B = 8, H = 256 runs 7-9% faster
// (GRU 3-6%), with bitwise the same results.
#ifndef FUSEDRNN_ALWAYS_INLINE
#define FUSEDRNN_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

template <typename S>
struct Vec;

template <>
struct Vec<float> {
  typedef float T __attribute__((vector_size(FUSEDRNN_VBYTES)));
  typedef int32_t I __attribute__((vector_size(FUSEDRNN_VBYTES)));
  static constexpr int L = FUSEDRNN_VBYTES / 4;
};

template <>
struct Vec<double> {
  typedef double T __attribute__((vector_size(FUSEDRNN_VBYTES)));
  typedef int64_t I __attribute__((vector_size(FUSEDRNN_VBYTES)));
  static constexpr int L = FUSEDRNN_VBYTES / 8;
};

template <typename S>
using V = typename Vec<S>::T;

// Unaligned load / store (memcpy compiles to one vector move).
template <typename S>
inline V<S> load(const S* p) {
  V<S> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename S>
inline void store(S* p, V<S> v) {
  std::memcpy(p, &v, sizeof v);
}
// The first n lanes only (n < L): tails of rows that are not a multiple of L.
template <typename S>
inline V<S> load_part(const S* p, int n) {
  V<S> v = {};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
template <typename S>
inline void store_part(S* p, V<S> v, int n) {
  for (int i = 0; i < n; ++i) p[i] = v[i];
}
// x in every lane (x - 0 is exactly x, -0 included, so this folds to one broadcast).
template <typename S>
inline V<S> splat(S x) {
  return x - V<S>{};
}

// Vector math policy for the cell headers (see csrc/cells/activations.h).
template <typename Scalar>
struct VecMath;

// float: polynomial exp and tanh, accurate to a few ulp; saturating.
template <>
struct VecMath<float> {
  using T = V<float>;
  using S = float;
  using I = Vec<float>::I;

  static inline T select(I mask, T a, T b) { return mask ? a : b; }

  // x limited to [lo, hi]; NaN stays NaN. With AVX2/AVX-512 one min and one max
  // (their result is the second operand, x, when either is NaN) instead of two
  // compare-and-blend pairs: the same values, a few instructions fewer in each
  // exp of a step's pointwise math.
  FUSEDRNN_ALWAYS_INLINE static T clamp(T x, S hi, S lo) {
#if FUSEDRNN_VBYTES == 64 && defined(__AVX512F__)
    return (T)_mm512_max_ps(_mm512_set1_ps(lo), _mm512_min_ps(_mm512_set1_ps(hi), (__m512)x));
#elif FUSEDRNN_VBYTES == 32 && defined(__AVX2__)
    return (T)_mm256_max_ps(_mm256_set1_ps(lo), _mm256_min_ps(_mm256_set1_ps(hi), (__m256)x));
#else
    x = select(x > hi, splat(hi), x);
    return select(x < lo, splat(lo), x);
#endif
  }
  // floor(x) for |x| < 2^31 (exp's argument range): the rounding instruction,
  // or truncation corrected downwards.
  FUSEDRNN_ALWAYS_INLINE static T floor(T x) {
#if FUSEDRNN_VBYTES == 64 && defined(__AVX512F__)
    return (T)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#elif FUSEDRNN_VBYTES == 32 && defined(__AVX2__)
    return (T)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
    const T n = __builtin_convertvector(__builtin_convertvector(x, I), T);
    return select(n > x, n - 1.0f, n);
#endif
  }

  // e^x: x = n ln2 + r, |r| <= ln2/2; e^r by a degree-6 polynomial; 2^n from
  // the exponent bits. Arguments are clamped so the result stays finite
  // (e^88.37 ~ 2.4e38) and 2^n stays a normal number or zero.
  FUSEDRNN_ALWAYS_INLINE static T exp(T x) {
    const S hi = 88.3762626647949f, lo = -87.3365447504f;
    x = clamp(x, hi, lo);
    const T fx = x * 1.44269504088896341f + 0.5f;
    const T n = floor(fx);
    const T r = x - n * 0.693359375f - n * -2.12194440e-4f;
    T p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const I bits = (__builtin_convertvector(n, I) + 127) << 23;
    T scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
  }
  // 1/x for x in [1, 3e38]: the hardware's approximate reciprocal refined by
  // one Newton step (relative error ~1e-7, like a division, at a third of
  // its cost); a plain division where no such instruction is compiled in.
  FUSEDRNN_ALWAYS_INLINE static T recip(T x) {
#if FUSEDRNN_VBYTES == 64 && defined(__AVX512F__)
    const T r = (T)_mm512_rcp14_ps((__m512)x);
    return r * (2.0f - x * r);
#elif FUSEDRNN_VBYTES == 32 && defined(__AVX2__)
    const T r = (T)_mm256_rcp_ps((__m256)x);
    return r * (2.0f - x * r);
#else
    return 1.0f / x;
#endif
  }
  FUSEDRNN_ALWAYS_INLINE static T sigmoid(T x) { return recip(1.0f + exp(-x)); }
  // tanh: odd polynomial near 0 (where 1 - 2/(e^2x + 1) would cancel),
  // 1 - 2/(e^(2|x|) + 1) with the sign of x elsewhere.
  FUSEDRNN_ALWAYS_INLINE static T tanh(T x) {
    const T ax = select(x < 0.0f, -x, x);
    const T z = x * x;
    T p = splat(-5.70498872745e-3f);
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const T small = p * z * x + x;
    T big = 1.0f - 2.0f * recip(exp(ax + ax) + 1.0f);
    big = select(x < 0.0f, -big, big);
    return select(ax < 0.625f, small, big);
  }
  static inline T relu(T x) { return select(x < 0.0f, T{}, x); }  // NaN stays NaN
  static inline T relu_grad(T y) { return select(y > 0.0f, splat(1.0f), T{}); }
};

// double: lane by lane with the C library, to keep float64 results within
// 1e-10 of the reference (float64 is the accuracy dtype, not the speed one).
template <>
struct VecMath<double> {
  using T = V<double>;
  using S = double;
  static inline double sigmoid1(double x) {
    if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
    const double e = std::exp(x);
    return e / (1.0 + e);
  }
  static inline T sigmoid(T x) {
    for (int i = 0; i < Vec<double>::L; ++i) x[i] = sigmoid1(x[i]);
    return x;
  }
  static inline T tanh(T x) {
    for (int i = 0; i < Vec<double>::L; ++i) x[i] = std::tanh(x[i]);
    return x;
  }
  static inline T relu(T x) { return x < 0.0 ? T{} : x; }  // NaN stays NaN
  static inline T relu_grad(T y) { return y > 0.0 ? splat(1.0) : T{}; }
};

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
