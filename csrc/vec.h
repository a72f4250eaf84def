#pragma once
// ATen's Vectorized<> picks its implementation from CPU_CAPABILITY_* macros that
// torch's own build sets per file; without them an extension gets the scalar
// fallback (std::exp per element). Select it from what -march=native enabled.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/vec.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

// s[j] = exp(s[j] * scale - shift) for j < n, vectorised; returns the sum.
inline float exp_shifted(float* s, int64_t n, float shift, float scale = 1.f) {
  using Vec = at::vec::Vectorized<float>;
  const Vec vshift(shift), vscale(scale);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec x = at::vec::fmsub(Vec::loadu(s + j), vscale, vshift).exp_u20();
    x.store(s + j);
    vsum = vsum + x;
  }
  float lanes[Vec::size()];
  vsum.store(lanes);
  float sum = 0.f;
  for (int64_t i = 0; i < Vec::size(); ++i) sum += lanes[i];
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] * scale - shift);
    sum += s[j];
  }
  return sum;
}

// max of s[0..n) (n >= 1). On AVX-512: plain vmaxps over two accumulators and a
// masked tail, without at::vec::maximum's NaN propagation (a compare and an or per
// vector, costly in a long prefill's softmax). A NaN score still poisons its row
// through exp.
inline float row_max(const float* s, int64_t n) {
#ifdef CPU_CAPABILITY_AVX512
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + j + 16));
  }
  for (; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    m0 = _mm512_max_ps(m0, _mm512_mask_loadu_ps(ninf, k, s + j));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
#else
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j]);
  return top;
#endif
}

#if defined(CPU_CAPABILITY_AVX512) && defined(DS_HAVE_AVX512BF16)
// exp(s * scale - shift) as 2^t, t = (s * scale - shift) * log2(e): 2^round(t)
// by vscalefps (0 far below fp32's range, NaN kept) times 2^(t - round(t)) from
// a degree-5 fit on [-1/2, 1/2] (relative error 1.5e-7), about half exp_u20's
// instructions. Hazard: the shift must come off before the change of base; with
// log2(e) folded into scale and shift, the large scores of attention sinks lose
// enough to its rounding to move bf16 logits measurably (test_model bounds it).
inline __m512 exp_scaled(__m512 s, __m512 scale, __m512 shift) {
  const __m512 t = _mm512_mul_ps(_mm512_fmsub_ps(s, scale, shift), _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(0.0013277444522827864f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009675883688032627f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550713092088699f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022112786769867f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469440460205f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}
#endif

// p[j] = bf16(exp(s[j] * scale - shift)) for j < n, vectorised; returns the sum of
// the fp32 values (s is left as it was). With AVX512-BF16 the rounding is one
// vcvtne2ps2bf16 (round to nearest even, as the generic path) and the last < 32
// values run masked instead of through scalar expf.
inline float exp_shifted_to_bf16(const float* s, at::BFloat16* p, int64_t n, float shift, float scale) {
  using Vec = at::vec::Vectorized<float>;
  Vec vsum(0.f);
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512) && defined(DS_HAVE_AVX512BF16)
  Vec vsum2(0.f);  // two sums: one chain of adds per 32 values was the loop's limit
  const __m512 sl = _mm512_set1_ps(scale), hl = _mm512_set1_ps(shift);
  for (; j + 32 <= n; j += 32) {
    const __m512 a = exp_scaled(_mm512_loadu_ps(s + j), sl, hl);
    const __m512 b = exp_scaled(_mm512_loadu_ps(s + j + 16), sl, hl);
    _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    vsum = vsum + Vec(a);
    vsum2 = vsum2 + Vec(b);
  }
  if (j < n) {
    const int64_t r = n - j;
    const __mmask16 ka = r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << r) - 1);
    const __mmask16 kb = r <= 16 ? __mmask16(0) : __mmask16((1u << (r - 16)) - 1);
    const __m512 a = _mm512_maskz_mov_ps(ka, exp_scaled(_mm512_maskz_loadu_ps(ka, s + j), sl, hl));
    const __m512 b = _mm512_maskz_mov_ps(kb, exp_scaled(_mm512_maskz_loadu_ps(kb, s + j + 16), sl, hl));
    const __mmask32 k = r >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << r) - 1);
    _mm512_mask_storeu_epi16(p + j, k, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    vsum = vsum + Vec(a);
    vsum2 = vsum2 + Vec(b);
    j = n;
  }
  vsum = vsum + vsum2;
#else
  const Vec vshift(shift), vscale(scale);
  for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
    const Vec a = at::vec::fmsub(Vec::loadu(s + j), vscale, vshift).exp_u20();
    const Vec b = at::vec::fmsub(Vec::loadu(s + j + Vec::size()), vscale, vshift).exp_u20();
    at::vec::convert_float_bfloat16(a, b).store(p + j);
    vsum = vsum + a + b;
  }
#endif
  float lanes[Vec::size()];
  vsum.store(lanes);
  float sum = 0.f;
  for (int64_t i = 0; i < Vec::size(); ++i) sum += lanes[i];
  for (; j < n; ++j) {
    const float e = std::exp(s[j] * scale - shift);
    p[j] = at::BFloat16(e);
    sum += e;
  }
  return sum;
}
