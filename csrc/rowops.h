#pragma once
// One row of the decoder layer's row-wise ops (RMSNorm with the residual add,
// SwiGLU's silu(gate) * up, RoPE + KV store), shared by the standalone kernels
// (norm_act.cpp, rope_store.cpp) and the decode team (layer_stack.cpp), so that
// both compute every element the same way. Each keeps torch's roundings (see
// kernels/reference.py).
#include "vec.h"

#include <cmath>
#include <cstdint>
#include <type_traits>

template <typename scalar_t>
inline void norm_row(const scalar_t* row, const scalar_t* w, int64_t H, double eps, scalar_t* dst) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) {
    const float v = static_cast<float>(row[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
  for (int64_t i = 0; i < H; ++i) {
    // normalise in fp32, round to the input dtype, then scale (as torch does)
    const scalar_t y = static_cast<scalar_t>(static_cast<float>(row[i]) * inv);
    dst[i] = static_cast<scalar_t>(static_cast<float>(w[i]) * static_cast<float>(y));
  }
}

// sum = x + d rounded to the dtype (torch's add), for the residual stream.
template <typename scalar_t>
inline void add_row(const scalar_t* x, const scalar_t* d, int64_t H, scalar_t* sum) {
  for (int64_t i = 0; i < H; ++i) sum[i] = static_cast<scalar_t>(static_cast<float>(x[i]) + static_cast<float>(d[i]));
}

// dst[i] = silu(g[i]) * u[i] for i < I.
template <typename scalar_t>
inline void silu_mul_row(const scalar_t* g, const scalar_t* u, int64_t I, scalar_t* dst) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    using bVec = at::vec::Vectorized<at::BFloat16>;
    using fVec = at::vec::Vectorized<float>;
    const fVec one(1.f);
    for (; i + bVec::size() <= I; i += bVec::size()) {
      auto [g0, g1] = at::vec::convert_bfloat16_float(bVec::loadu(g + i));
      auto [u0, u1] = at::vec::convert_bfloat16_float(bVec::loadu(u + i));
      // silu rounded to bf16 first, then the product rounded, as torch does
      auto s = at::vec::convert_float_bfloat16(g0 / (one + g0.neg().exp()), g1 / (one + g1.neg().exp()));
      auto [s0, s1] = at::vec::convert_bfloat16_float(s);
      at::vec::convert_float_bfloat16(s0 * u0, s1 * u1).store(dst + i);
    }
  }
  for (; i < I; ++i) {
    const float gv = static_cast<float>(g[i]);
    const scalar_t s = static_cast<scalar_t>(gv / (1.f + std::exp(-gv)));  // F.silu, rounded
    dst[i] = static_cast<scalar_t>(static_cast<float>(s) * static_cast<float>(u[i]));
  }
}

// Rotate-half RoPE of one head row in place.
template <typename scalar_t>
inline void rotate_row(scalar_t* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]);
    const float x2 = static_cast<float>(x[i + half]);
    x[i] = static_cast<scalar_t>(x1 * cos[i] - x2 * sin[i]);
    x[i + half] = static_cast<scalar_t>(x2 * cos[i] + x1 * sin[i]);
  }
}

// One token: rotate its hq query heads and hkv key heads (rows `qs1` / `ks1`
// apart) at position `pos`, and store its keys and values (rows `vs1` apart)
// into the pool rows `kdst` / `vdst` (hkv * D values each).
template <typename scalar_t>
inline void rope_store_token(scalar_t* q, int64_t qs1, int64_t hq, scalar_t* k, int64_t ks1, const scalar_t* v,
                             int64_t vs1, int64_t hkv, int64_t D, const float* cos_sin, int64_t pos,
                             scalar_t* kdst, scalar_t* vdst) {
  const int64_t half = D / 2;
  const float* cos = cos_sin + pos * D;
  const float* sin = cos + half;
  for (int64_t h = 0; h < hq; ++h) rotate_row(q + h * qs1, cos, sin, half);
  for (int64_t h = 0; h < hkv; ++h) {
    scalar_t* krow = k + h * ks1;
    rotate_row(krow, cos, sin, half);
    const scalar_t* vrow = v + h * vs1;
    for (int64_t d = 0; d < D; ++d) {
      kdst[h * D + d] = krow[d];
      vdst[h * D + d] = vrow[d];
    }
  }
}
