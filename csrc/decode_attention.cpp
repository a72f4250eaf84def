// Decode attention straight from the token-slot pool: one query token per request,
// K/V gathered by slot index on the fly (no copy), online softmax over blocks of
// tokens. bf16 with a common head shape runs a register-tiled task per (request,
// KV head) (decode_bf16_grouped); otherwise one task per request widens each K/V
// row to fp32 once (vectorised) for every query head.
#include "ops.h"

#include <ATen/Parallel.h>

#include "amx.h"
#include "team.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

// dst[0:n] = float(src[0:n]), vectorised for bf16 (the pool's usual dtype).
template <typename scalar_t>
inline void widen(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void widen<float>(const float* src, float* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

template <>
inline void widen<at::BFloat16>(const at::BFloat16* src, float* dst, int64_t n) {
  using bVec = at::vec::Vectorized<at::BFloat16>;
  using fVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + bVec::size() <= n; i += bVec::size()) {
    auto halves = at::vec::convert_bfloat16_float(bVec::loadu(src + i));
    std::get<0>(halves).store(dst + i);
    std::get<1>(halves).store(dst + i + fVec::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
#ifdef CPU_CAPABILITY_AVX512
  float sum = _mm512_reduce_add_ps(acc);
#else
  float lanes[Vec::size()];
  acc.store(lanes);
  float sum = 0.f;
  for (int64_t l = 0; l < Vec::size(); ++l) sum += lanes[l];
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename scalar_t>
void decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& table, const at::Tensor& rows, const at::Tensor& lens,
                 float scale, at::Tensor& out) {
  const int64_t B = q.size(0), hq = q.size(1), D = q.size(2), hkv = k_cache.size(1);
  const int64_t G = hq / hkv, width = table.size(1), row_len = hkv * D;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kc = k_cache.data_ptr<scalar_t>();
  const scalar_t* vc = v_cache.data_ptr<scalar_t>();
  const int32_t* tab = table.data_ptr<int32_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);

  // One task per request: each token's K and V rows (all KV heads, contiguous in
  // the pool) are read once, in slot order, for every query head.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(hq * D), acc(hq * D), scores(hq * kBlock), m(hq), l(hq);
    std::vector<float> kf(row_len * kBlock), vf(row_len);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = lp[b];
      const int32_t* slots = tab + rp[b] * width;
      for (int64_t h = 0; h < hq; ++h) {
        const scalar_t* src = qp + b * qs0 + h * qs1;
        for (int64_t d = 0; d < D; ++d) qf[h * D + d] = static_cast<float>(src[d]) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
        const int64_t nb = std::min(kBlock, n - t0);
        // K rows widened once to fp32 (token-major), then one dot product per
        // (query head, token) against its KV head's slice
        for (int64_t j = 0; j < nb; ++j)
          widen(kc + static_cast<int64_t>(slots[t0 + j]) * row_len, &kf[j * row_len], row_len);
        for (int64_t h = 0; h < hq; ++h) {
          float* sh = &scores[h * kBlock];
          const float* qh = &qf[h * D];
          const int64_t off = (h / G) * D;
          for (int64_t j = 0; j < nb; ++j) sh[j] = dot(qh, &kf[j * row_len + off], D);
          const float block_max = row_max(sh, nb);
          const float new_m = std::max(m[h], block_max);
          const float corr = std::exp(m[h] - new_m);
          l[h] = l[h] * corr + exp_shifted(sh, nb, new_m);
          float* a = &acc[h * D];
          for (int64_t d = 0; d < D; ++d) a[d] *= corr;
          m[h] = new_m;
        }
        for (int64_t j = 0; j < nb; ++j) {
          const scalar_t* vrow = vc + static_cast<int64_t>(slots[t0 + j]) * row_len;
          widen(vrow, vf.data(), row_len);
          for (int64_t h = 0; h < hq; ++h) {
            const float p = scores[h * kBlock + j];
            const float* vh = &vf[(h / G) * D];
            float* a = &acc[h * D];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] += p * vh[d];
          }
        }
      }
      for (int64_t h = 0; h < hq; ++h) {
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
        scalar_t* dst = op + (b * hq + h) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[h * D + d] * inv);
      }
    }
  });
}

// out[0:V] = the V * Vectorized<float>::size() bf16 values at src (16 lanes a
// vector on AVX-512, 8 on AVX2), widened to fp32 vectors.
template <int V>
inline void widen_bf16(const at::BFloat16* src, at::vec::Vectorized<float> (&out)[V]) {
  constexpr int64_t lanes = at::vec::Vectorized<float>::size();
  for (int v = 0; v < V; v += 2) {
    auto halves = at::vec::convert_bfloat16_float(at::vec::Vectorized<at::BFloat16>::loadu(src + v * lanes));
    out[v] = std::get<0>(halves);
    out[v + 1] = std::get<1>(halves);
  }
}

#if defined(DS_HAVE_AVX512BF16) && defined(CPU_CAPABILITY_AVX512)
// Without AMX tiles, the scores come from AVX512-BF16 dot products over the raw
// bf16 K rows (exact products, fp32 sums; the scale moves into the softmax, where
// it is exact for a power-of-two scale), four tokens' sums reduced together
// (faster than widening each K row to fp32 first: docs/kernels.md).
#define DS_DECODE_DPBF16 1
#endif

// bf16 fast path: one task per (request, KV head), the query-head group's queries
// and output accumulators held in registers (G heads x NV float vectors: the head
// dim D = 16 * V over the CPU's vector width), each K/V head slice widened once
// straight into registers.
// Tasks [begin, end) on the calling thread.
template <int G, int V>
void decode_bf16_tasks(const at::BFloat16* qp, int64_t qs0, int64_t qs1, const at::BFloat16* kc,
                       const at::BFloat16* vc, int64_t hkv, const int32_t* tab, int64_t width, const int64_t* rp,
                       const int64_t* lp, float scale, at::BFloat16* op, int64_t begin, int64_t end) {
  using fVec = at::vec::Vectorized<float>;
  constexpr int64_t D = V * 16;
  constexpr int NV = static_cast<int>(D / fVec::size());
  static_assert(NV % 2 == 0 && NV * fVec::size() == D, "bf16 loads widen into pairs of float vectors");
  const int64_t row_len = hkv * D;
  {
    float sc[G][kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / hkv, g = task % hkv;
      const int64_t n = lp[b];
      const int32_t* slots = tab + rp[b] * width;
      fVec acc[G][NV];
      float m[G], l[G];
#ifdef DS_DECODE_DPBF16
      // q . k straight from the bf16 values (exact products, fp32 sums), 32 lanes
      // per instruction; the scale goes into the softmax instead
      __m512i qb[G][V / 2];
      for (int h = 0; h < G; ++h)
        for (int c = 0; c < V / 2; ++c)
          qb[h][c] = _mm512_loadu_si512(qp + b * qs0 + (g * G + h) * qs1 + c * 32);
      const float softmax_scale = scale;
#else
      fVec qv[G][NV];
      for (int h = 0; h < G; ++h) {
        widen_bf16<NV>(qp + b * qs0 + (g * G + h) * qs1, qv[h]);
        for (int v = 0; v < NV; ++v) qv[h][v] = qv[h][v] * fVec(scale);
      }
      const float softmax_scale = 1.f;
#endif
      for (int h = 0; h < G; ++h) {
        for (int v = 0; v < NV; ++v) acc[h][v] = fVec(0.f);
        m[h] = -std::numeric_limits<float>::infinity();
        l[h] = 0.f;
      }
      for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
        const int64_t nb = std::min(kBlock, n - t0);
        int64_t j = 0;
#ifdef DS_DECODE_DPBF16
        // four tokens at a time: their dot products reduced together (one tree
        // of adds for four sums instead of four horizontal reductions)
        for (; j + 4 <= nb; j += 4) {
          __m512i kb[4][V / 2];
          for (int t = 0; t < 4; ++t)
            for (int c = 0; c < V / 2; ++c)
              kb[t][c] = _mm512_loadu_si512(kc + static_cast<int64_t>(slots[t0 + j + t]) * row_len + g * D + c * 32);
          for (int h = 0; h < G; ++h) {
            __m512 d[4];
            for (int t = 0; t < 4; ++t) {
              d[t] = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)qb[h][0], (__m512bh)kb[t][0]);
              for (int c = 1; c < V / 2; ++c) d[t] = _mm512_dpbf16_ps(d[t], (__m512bh)qb[h][c], (__m512bh)kb[t][c]);
            }
            _mm_storeu_ps(&sc[h][j], hsum4(d[0], d[1], d[2], d[3]));
          }
        }
        for (; j < nb; ++j) {
          __m512i kb[V / 2];
          for (int c = 0; c < V / 2; ++c)
            kb[c] = _mm512_loadu_si512(kc + static_cast<int64_t>(slots[t0 + j]) * row_len + g * D + c * 32);
          for (int h = 0; h < G; ++h) {
            __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)qb[h][0], (__m512bh)kb[0]);
            for (int c = 1; c < V / 2; ++c) d = _mm512_dpbf16_ps(d, (__m512bh)qb[h][c], (__m512bh)kb[c]);
            sc[h][j] = _mm512_reduce_add_ps(d);
          }
        }
#else
        for (; j < nb; ++j) {
          fVec kv[NV];
          widen_bf16<NV>(kc + static_cast<int64_t>(slots[t0 + j]) * row_len + g * D, kv);
          for (int h = 0; h < G; ++h) {
            fVec d = qv[h][0] * kv[0];
            for (int v = 1; v < NV; ++v) d = at::vec::fmadd(qv[h][v], kv[v], d);
#ifdef CPU_CAPABILITY_AVX512
            sc[h][j] = _mm512_reduce_add_ps(d);
#else
            float lanes[fVec::size()];
            d.store(lanes);
            float sum = 0.f;
            for (int i = 0; i < fVec::size(); ++i) sum += lanes[i];
            sc[h][j] = sum;
#endif
          }
        }
#endif
        for (int h = 0; h < G; ++h) {
          const float block_max = row_max(sc[h], nb) * softmax_scale;
          const float new_m = std::max(m[h], block_max);
          const float corr = std::exp(m[h] - new_m);
          l[h] = l[h] * corr + exp_shifted(sc[h], nb, new_m, softmax_scale);
          for (int v = 0; v < NV; ++v) acc[h][v] = acc[h][v] * fVec(corr);
          m[h] = new_m;
        }
        for (int64_t j = 0; j < nb; ++j) {
          fVec vv[NV];
          widen_bf16<NV>(vc + static_cast<int64_t>(slots[t0 + j]) * row_len + g * D, vv);
          for (int h = 0; h < G; ++h) {
            const fVec p(sc[h][j]);
            for (int v = 0; v < NV; ++v) acc[h][v] = at::vec::fmadd(p, vv[v], acc[h][v]);
          }
        }
      }
      for (int h = 0; h < G; ++h) {
        const fVec inv(l[h] > 0.f ? 1.f / l[h] : 0.f);
        at::BFloat16* dst = op + (b * G * hkv + g * G + h) * D;
        for (int v = 0; v < NV; v += 2)
          at::vec::convert_float_bfloat16(acc[h][v] * inv, acc[h][v + 1] * inv).store(dst + v * fVec::size());
      }
    }
  }
}

template <int G, int V>
void decode_bf16_grouped(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& table, const at::Tensor& rows, const at::Tensor& lens,
                         float scale, at::Tensor& out) {
  const int64_t B = q.size(0), hkv = k_cache.size(1);
  at::parallel_for(0, B * hkv, 1, [&](int64_t begin, int64_t end) {
    decode_bf16_tasks<G, V>(q.data_ptr<at::BFloat16>(), q.stride(0), q.stride(1), k_cache.data_ptr<at::BFloat16>(),
                            v_cache.data_ptr<at::BFloat16>(), hkv, table.data_ptr<int32_t>(), table.size(1),
                            rows.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), scale, out.data_ptr<at::BFloat16>(),
                            begin, end);
  });
}

#ifdef DS_HAVE_AMX
// AMX path (bf16, D % 32 == 0): the query rows of one request and KV head (its
// query tokens x the G query heads sharing that KV head, 16 at a time) attend in
// two passes over their keys, the whole softmax in between (so no running
// rescale). Scores: S^T = K Q^T per 16 keys, K as the A operand as it lies in a
// slot (16 keys' head slices gathered into a buffer, D/32 tiles), the query rows
// as the B operand (pair-interleaved once per task). Output: P V per 32 keys, the
// bf16 probabilities [rows x 32] as A, V pair-interleaved (two keys' rows woven
// together, 16 dims a tile) as B, D/16 accumulators of [rows x 16]. Keys past a
// row's causal limit get zero probability and keys past the last row's are zeros
// (never the pool's unwritten memory: 0 * NaN is NaN). One tile product is
// 16x32x16 multiply-adds; the register-tiled decode kernel below spent three
// horizontal sums per key and was compute-bound at 2.5x the memory time of a
// decode step's KV.
constexpr int kAmxDChunk = 64;  // output dims per pass over V: four accumulator tiles
constexpr int64_t kAhead = 32;  // keys ahead that a pass prefetches: slots are scattered, so the
                                // hardware prefetcher cannot follow them

// Every cache line of one head slice (n bf16 values).
inline void prefetch_row(const uint16_t* row, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
}

}  // namespace

bool attend_amx_supported(const at::Tensor& q, const at::Tensor& k_cache) {
  return q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
         AmxAttention::supported(q.size(1), k_cache.size(1), q.size(2));
}

AmxAttention::AmxAttention(int64_t hq, int64_t hkv, int64_t D, const int64_t* rows, std::vector<int64_t> prefix_lens,
                           std::vector<int64_t> extend_lens, float scale)
    : hkv_(hkv), D_(D), G_(hq / hkv), scale_(scale), rows_(rows), prefix_lens_(std::move(prefix_lens)),
      extend_lens_(std::move(extend_lens)) {
  const int64_t B = static_cast<int64_t>(extend_lens_.size());
  // tasks: (request, KV head, block of 16 query rows)
  q_start_.resize(B);
  task_start_.assign(B + 1, 0);
  for (int64_t b = 0, acc = 0; b < B; ++b) {
    q_start_[b] = acc;
    acc += extend_lens_[b];
    task_start_[b + 1] = task_start_[b] + hkv * ((extend_lens_[b] * G_ + 15) / 16);
    cap_ = std::max(cap_, prefix_lens_[b] + extend_lens_[b]);
  }
  cap_ = (cap_ + 31) / 32 * 32;
}

void AmxAttention::run(int64_t begin, int64_t end, const Layer& io) const {
  const int64_t hkv = hkv_, G = G_, D = D_, row_len = hkv * D, nkb = D / 32, cap = cap_, width = io.width;
  const float scale = scale_;
  const auto& q_start = q_start_;
  const auto& task_start = task_start_;
  const auto& prefix_lens = prefix_lens_;
  const auto& extend_lens = extend_lens_;
  const int64_t* rp = rows_;
  const uint16_t* qp = io.q;
  const uint16_t* kc = io.k;
  const uint16_t* vc = io.v;
  const int32_t* tab = io.table;
  at::BFloat16* op = io.out;
  const int64_t qs0 = io.qs0, qs1 = io.qs1, os0 = io.os0, os1 = io.os1;

  // permutex2var indices weaving a (lanes 0-31) and b (32-63) pairwise
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int i = 0; i < 16; ++i) {
    lo_idx[2 * i] = static_cast<uint16_t>(i);
    lo_idx[2 * i + 1] = static_cast<uint16_t>(32 + i);
    hi_idx[2 * i] = static_cast<uint16_t>(16 + i);
    hi_idx[2 * i + 1] = static_cast<uint16_t>(48 + i);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  {
    std::vector<float> s(16 * cap);
    TileVector<uint16_t> p(16 * cap);
    TileVector<uint16_t> kbuf(16 * D);
    alignas(64) uint32_t qt[4][16][16];
    alignas(64) float ctmp[4][16][16];
    alignas(64) uint32_t vbuf[4][16][16];
    float l[16];
    int64_t lim[16];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = std::upper_bound(task_start.begin(), task_start.end(), task) - task_start.begin() - 1;
      const int64_t chunks = (extend_lens[b] * G + 15) / 16, local = task - task_start[b];
      const int64_t g = local / chunks, r0 = (local % chunks) * 16;
      const int64_t nr = std::min<int64_t>(16, extend_lens[b] * G - r0);
      const int32_t* slots = tab + rp[b] * width;
      int64_t n = 0;  // keys any row of the block sees
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t t = (r0 + r) / G, h = g * G + (r0 + r) % G;
        lim[r] = prefix_lens[b] + t + 1;
        n = std::max(n, lim[r]);
        const auto* qh = reinterpret_cast<const uint32_t*>(qp + (q_start[b] + t) * qs0 + h * qs1);
        for (int64_t d = 0; d < D / 2; ++d) qt[d / 16][d % 16][r] = qh[d];
      }
      const int64_t n32 = (n + 31) / 32 * 32;
      TileConfig scores_cfg, out_cfg;
      for (int t = 0; t < nkb; ++t) scores_cfg.set(t, 16, static_cast<int>(nr * 4));  // Q^T blocks
      scores_cfg.set(6, 16, 64);                                                    // 16 keys x 32 dims
      scores_cfg.set(7, 16, static_cast<int>(nr * 4));                              // S^T [16 x rows]
      for (int t = 0; t < 4; ++t) out_cfg.set(t, static_cast<int>(nr), 64);         // O [rows x 16 dims]
      out_cfg.set(4, static_cast<int>(nr), 64);                                     // P [rows x 32 keys]
      out_cfg.set(5, 16, 64);                                                       // V pairs x 16 dims

      scores_cfg.load();
      _tile_loadd(0, qt[0], 64);
      if (nkb > 1) _tile_loadd(1, qt[1], 64);
      if (nkb > 2) _tile_loadd(2, qt[2], 64);
      if (nkb > 3) _tile_loadd(3, qt[3], 64);
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const int64_t nb = std::min<int64_t>(16, n - t0);
        for (int64_t j = 0; j < nb && t0 + kAhead + j < n; ++j)
          prefetch_row(kc + static_cast<int64_t>(slots[t0 + kAhead + j]) * row_len + g * D, D);
        // 16 keys in consecutive slots (as a prefill and the decode steps after
        // it usually leave them) load straight from the pool; others (and the
        // last, partial block) are gathered into kbuf, zero past the end
        bool run = nb == 16;
        for (int64_t j = 1; run && j < 16; ++j) run = slots[t0 + j] == slots[t0] + j;
        const uint16_t* kt = kbuf.data();
        int64_t kstride = D * 2;
        if (run) {
          kt = kc + static_cast<int64_t>(slots[t0]) * row_len + g * D;
          kstride = row_len * 2;
        } else {
          for (int64_t j = 0; j < nb; ++j)
            std::memcpy(&kbuf[j * D], kc + static_cast<int64_t>(slots[t0 + j]) * row_len + g * D, D * 2);
          for (int64_t j = nb; j < 16; ++j) std::memset(&kbuf[j * D], 0, D * 2);
        }
        _tile_zero(7);
        _tile_loadd(6, kt, kstride);
        _tile_dpbf16ps(7, 6, 0);
        if (nkb > 1) {
          _tile_loadd(6, kt + 32, kstride);
          _tile_dpbf16ps(7, 6, 1);
        }
        if (nkb > 2) {
          _tile_loadd(6, kt + 64, kstride);
          _tile_dpbf16ps(7, 6, 2);
        }
        if (nkb > 3) {
          _tile_loadd(6, kt + 96, kstride);
          _tile_dpbf16ps(7, 6, 3);
        }
        _tile_stored(7, ctmp[0], 64);
        __m512 cols[16];
        if (nr > 4) {
          transpose16(ctmp[0], cols);
        } else {  // a few rows (decode's query-head group): gather them
          for (int64_t r = 0; r < nr; ++r) cols[r] = tile_column(ctmp[0], static_cast<int>(r));
        }
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t live = std::min<int64_t>(16, lim[r] - t0);
          if (live <= 0) continue;
          _mm512_mask_storeu_ps(&s[r * cap + t0], live == 16 ? __mmask16(0xFFFF) : __mmask16((1u << live) - 1),
                                _mm512_mul_ps(cols[r], _mm512_set1_ps(scale)));
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        float* sr = &s[r * cap];
        auto* pr = reinterpret_cast<at::BFloat16*>(&p[r * cap]);
        l[r] = exp_shifted_to_bf16(sr, pr, lim[r], row_max(sr, lim[r]), 1.f);
        std::memset(&p[r * cap + lim[r]], 0, (n32 - lim[r]) * 2);
      }
      out_cfg.load();
      for (int64_t d0 = 0; d0 < D; d0 += kAmxDChunk) {
        const int64_t nd = std::min<int64_t>(4, (D - d0) / 16);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t t0 = 0; t0 < n; t0 += 32) {
          for (int64_t pp = 0; pp < 16; ++pp) {
            const int64_t ka = t0 + 2 * pp, kb = ka + 1;
            for (int64_t c = 0; c < nd / 2; ++c) {
              const int64_t off = g * D + d0 + 32 * c;
              const __m512i va = ka < n ? _mm512_loadu_si512(vc + static_cast<int64_t>(slots[ka]) * row_len + off)
                                        : _mm512_setzero_si512();
              const __m512i vb = kb < n ? _mm512_loadu_si512(vc + static_cast<int64_t>(slots[kb]) * row_len + off)
                                        : _mm512_setzero_si512();
              _mm512_store_si512(vbuf[2 * c][pp], _mm512_permutex2var_epi16(va, lo, vb));
              _mm512_store_si512(vbuf[2 * c + 1][pp], _mm512_permutex2var_epi16(va, hi, vb));
            }
            for (int64_t j = t0 + kAhead + 2 * pp; j < std::min(n, t0 + kAhead + 2 * pp + 2); ++j)
              prefetch_row(vc + static_cast<int64_t>(slots[j]) * row_len + g * D + d0,
                           std::min<int64_t>(D - d0, kAmxDChunk));
          }
          _tile_loadd(4, &p[t0], cap * 2);
          _tile_loadd(5, vbuf[0], 64);
          _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(5, vbuf[1], 64);
          _tile_dpbf16ps(1, 4, 5);
          if (nd > 2) {
            _tile_loadd(5, vbuf[2], 64);
            _tile_dpbf16ps(2, 4, 5);
            _tile_loadd(5, vbuf[3], 64);
            _tile_dpbf16ps(3, 4, 5);
          }
        }
        _tile_stored(0, ctmp[0], 64);
        _tile_stored(1, ctmp[1], 64);
        if (nd > 2) {
          _tile_stored(2, ctmp[2], 64);
          _tile_stored(3, ctmp[3], 64);
        }
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t t = (r0 + r) / G, h = g * G + (r0 + r) % G;
          const __m512 inv = _mm512_set1_ps(l[r] > 0.f ? 1.f / l[r] : 0.f);
          at::BFloat16* dst = op + (q_start[b] + t) * os0 + h * os1 + d0;
          for (int64_t dt = 0; dt < nd; ++dt)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + dt * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(ctmp[dt][r]), inv)));
        }
      }
    }
  }
}

void attend_amx(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& table,
                const int64_t* rp, const std::vector<int64_t>& prefix_lens, const std::vector<int64_t>& extend_lens,
                float scale, at::Tensor& out) {
  const AmxAttention attn(q.size(1), k_cache.size(1), q.size(2), rp, prefix_lens, extend_lens, scale);
  const AmxAttention::Layer io{reinterpret_cast<const uint16_t*>(q.data_ptr()),
                               q.stride(0),
                               q.stride(1),
                               reinterpret_cast<const uint16_t*>(k_cache.data_ptr()),
                               reinterpret_cast<const uint16_t*>(v_cache.data_ptr()),
                               table.data_ptr<int32_t>(),
                               table.size(1),
                               out.data_ptr<at::BFloat16>(),
                               out.stride(0),
                               out.stride(1)};
  at::parallel_for(0, attn.tasks(), 1, [&](int64_t begin, int64_t end) {
    attn.run(begin, end, io);
    _tile_release();
  });
}

namespace {
#endif

// The (query heads per KV head, head dim / 16) shapes with a register-tiled path.
#define DS_DECODE_CASES                                                            \
  DS_DECODE_CASE(1, 4) DS_DECODE_CASE(2, 4) DS_DECODE_CASE(3, 4) DS_DECODE_CASE(4, 4) \
  DS_DECODE_CASE(1, 8) DS_DECODE_CASE(2, 8)
bool decode_bf16_fast(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& table, const at::Tensor& rows, const at::Tensor& lens, float scale,
                      at::Tensor& out) {
  if (q.scalar_type() != at::kBFloat16) return false;
  const int64_t G = q.size(1) / k_cache.size(1), D = q.size(2);
#define DS_DECODE_CASE(GG, VV)                                                      \
  if (G == GG && D == VV * 16) {                                                    \
    decode_bf16_grouped<GG, VV>(q, k_cache, v_cache, table, rows, lens, scale, out); \
    return true;                                                                    \
  }
  DS_DECODE_CASES
#undef DS_DECODE_CASE
  return false;
}

}  // namespace

bool vec_decode_supported(int64_t G, int64_t D) {
#define DS_DECODE_CASE(GG, VV) \
  if (G == GG && D == VV * 16) return true;
  DS_DECODE_CASES
#undef DS_DECODE_CASE
  return false;
}

void vec_decode_tasks(int64_t G, int64_t D, const uint16_t* q, int64_t qs0, int64_t qs1, const uint16_t* k,
                      const uint16_t* v, int64_t hkv, const int32_t* table, int64_t width, const int64_t* rows,
                      const int64_t* lens, float scale, at::BFloat16* out, int64_t begin, int64_t end) {
  const auto* qb = reinterpret_cast<const at::BFloat16*>(q);
  const auto* kb = reinterpret_cast<const at::BFloat16*>(k);
  const auto* vb = reinterpret_cast<const at::BFloat16*>(v);
#define DS_DECODE_CASE(GG, VV)                                                                               \
  if (G == GG && D == VV * 16)                                                                               \
    return decode_bf16_tasks<GG, VV>(qb, qs0, qs1, kb, vb, hkv, table, width, rows, lens, scale, out, begin, \
                                     end);
  DS_DECODE_CASES
#undef DS_DECODE_CASE
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& req_to_token, const at::Tensor& req_pool_indices,
                            const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, Hq, D] with contiguous rows");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "pool must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and the pool must share a dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(req_to_token.scalar_type() == at::kInt && req_to_token.is_contiguous(),
              "req_to_token must be contiguous int32");
  auto rows = req_pool_indices.to(at::kLong).contiguous();
  auto lens = seq_lens.to(at::kLong).contiguous();
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
#ifdef DS_HAVE_AMX
  if (attend_amx_supported(q, k_cache)) {  // one query token per request: prefix = length - 1
    const int64_t B = q.size(0);
    const int64_t* lp = lens.data_ptr<int64_t>();
    std::vector<int64_t> prefix(B), ones(B, 1);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(lp[b] >= 1 && lp[b] <= req_to_token.size(1), "sequence length out of range");
      prefix[b] = lp[b] - 1;
    }
    attend_amx(q, k_cache, v_cache, req_to_token, rows.data_ptr<int64_t>(), prefix, ones, static_cast<float>(scale),
               out);
    return out;
  }
#endif
  if (decode_bf16_fast(q, k_cache, v_cache, req_to_token, rows, lens, static_cast<float>(scale), out)) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_impl<scalar_t>(q, k_cache, v_cache, req_to_token, rows, lens, static_cast<float>(scale), out);
  });
  return out;
}
