// Decode attention straight from the token-slot pool: one query token per request,
// K/V gathered by slot index on the fly (no copy), online softmax over blocks of
// tokens, one task per (request, KV head) so each K/V row is read once for the
// whole query-head group.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;

template <typename scalar_t>
inline float dot(const float* q, const scalar_t* k, int64_t D) {
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += q[d] * static_cast<float>(k[d]);
  return s;
}

template <typename scalar_t>
void decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& table, const at::Tensor& rows, const at::Tensor& lens,
                 float scale, at::Tensor& out) {
  const int64_t B = q.size(0), hq = q.size(1), D = q.size(2), hkv = k_cache.size(1);
  const int64_t G = hq / hkv, width = table.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kc = k_cache.data_ptr<scalar_t>();
  const scalar_t* vc = v_cache.data_ptr<scalar_t>();
  const int32_t* tab = table.data_ptr<int32_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);

  at::parallel_for(0, B * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores(G * kBlock), m(G), l(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / hkv, h = task % hkv, n = lp[b];
      const int32_t* slots = tab + rp[b] * width;
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* src = qp + b * qs0 + (h * G + g) * qs1;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(src[d]) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
        const int64_t nb = std::min(kBlock, n - t0);
        for (int64_t j = 0; j < nb; ++j) {
          const scalar_t* krow = kc + (static_cast<int64_t>(slots[t0 + j]) * hkv + h) * D;
          for (int64_t g = 0; g < G; ++g) scores[g * kBlock + j] = dot(&qf[g * D], krow, D);
        }
        for (int64_t g = 0; g < G; ++g) {
          float* s = &scores[g * kBlock];
          float block_max = *std::max_element(s, s + nb);
          const float new_m = std::max(m[g], block_max);
          const float corr = std::exp(m[g] - new_m);
          l[g] *= corr;
          for (int64_t d = 0; d < D; ++d) acc[g * D + d] *= corr;
          for (int64_t j = 0; j < nb; ++j) {
            s[j] = std::exp(s[j] - new_m);
            l[g] += s[j];
          }
          m[g] = new_m;
        }
        for (int64_t j = 0; j < nb; ++j) {
          const scalar_t* vrow = vc + (static_cast<int64_t>(slots[t0 + j]) * hkv + h) * D;
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * kBlock + j];
            float* a = &acc[g * D];
            for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(vrow[d]);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        scalar_t* dst = op + (b * hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[g * D + d] * inv);
      }
    }
  });
}

}  // namespace

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_impl<scalar_t>(q, k_cache, v_cache, req_to_token, rows, lens, static_cast<float>(scale), out);
  });
  return out;
}
