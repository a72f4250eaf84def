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

// p[j] = bf16(exp(s[j] * scale - shift)) for j < n, vectorised; returns the sum of
// the fp32 values (s is left as it was).
inline float exp_shifted_to_bf16(const float* s, at::BFloat16* p, int64_t n, float shift, float scale) {
  using Vec = at::vec::Vectorized<float>;
  const Vec vshift(shift), vscale(scale);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
    const Vec a = at::vec::fmsub(Vec::loadu(s + j), vscale, vshift).exp_u20();
    const Vec b = at::vec::fmsub(Vec::loadu(s + j + Vec::size()), vscale, vshift).exp_u20();
    at::vec::convert_float_bfloat16(a, b).store(p + j);
    vsum = vsum + a + b;
  }
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
