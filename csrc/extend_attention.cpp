// Extend (prefill) attention over the slot pool, fused with RoPE and the KV store:
// one call per layer for a ragged batch. Request b's queries sit at positions
// prefix_lens[b] .. prefix_lens[b] + extend_lens[b] - 1 and see every key of its
// sequence up to their own position, read from the pool through req_to_token.
// The cross-model recompute of a layer span over a stored prefix runs through it
// (its prefix is the part of the span already recomputed plus the receiver's own).
#include "ops.h"
#include "vec.h"  // before any ATen header that pulls in Vectorized<>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Causal bf16 attention of one request, blocked over queries: per (KV head, block
// of BQ queries) the block's G query heads are stacked into one [G * BQ, D] matrix,
// scores against every key the block sees come from one brgemm with fp32 output
// (as exact as SDPA's flash kernel, which also keeps scores in fp32), one pass per
// row applies scale, the causal limit and softmax and writes bf16 probabilities,
// and oneDNN's bf16 matmul multiplies them by V. Per layer at 2,048 tokens on the
// default model (9 query / 3 KV heads of 64), SDPA's CPU flash kernel took 38 ms,
// this path 23-25 (with a prefix of 2,000 and 64 new tokens: 2.2 -> 1.8 ms), on a
// CPU without AMX. With AMX, both products run as brgemm on tiles over packed
// K^T and V, and the probabilities are left unnormalised (each output row is
// divided by its sum after P @ V): 32 -> 16-19 ms per layer at 2,048 tokens.
constexpr int64_t BQ = 64;
constexpr int64_t kKB = 64;  // keys per packed block (oneDNN's VNNI B takes ld_b <= 64)

inline float row_max(const float* s, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  Vec m(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) m = at::vec::maximum(m, Vec::loadu(s + j));
  float lanes[Vec::size()];
  m.store(lanes);
  float top = *std::max_element(lanes, lanes + Vec::size());
  for (; j < n; ++j) top = std::max(top, s[j]);
  return top;
}

// Softmax of s[0..n) * scale, in place in fp32, then written to p as bf16.
inline void softmax_to_bf16(float* s, at::BFloat16* p, int64_t n, float scale) {
  using fVec = at::vec::Vectorized<float>;
  const float sum = exp_shifted(s, n, row_max(s, n) * scale, scale);
  const float inv = 1.f / sum;
  const fVec vinv(inv);
  int64_t j = 0;
  for (; j + 2 * fVec::size() <= n; j += 2 * fVec::size())
    at::vec::convert_float_bfloat16(fVec::loadu(s + j) * vinv, fVec::loadu(s + j + fVec::size()) * vinv)
        .store(p + j);
  for (; j < n; ++j) p[j] = at::BFloat16(s[j] * inv);
}

void blocked_causal_bf16(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t p,
                         float scale, at::Tensor out) {
  // q, out: [n, Hq, D] (strided views); keys, values: [p + n, Hk, D]; query j sits
  // at position p + j and sees keys 0 .. p + j.
  const int64_t n = q.size(0), hq = q.size(1), D = q.size(2), hk = keys.size(1), L = keys.size(0);
  const int64_t G = hq / hk, nb = (n + BQ - 1) / BQ;
  // Where oneDNN's brgemm runs on AMX it wants B pair-interleaved (VNNI): K^T is
  // packed per block of kKB keys (its ld_b is at most 64), V whole, both padded
  // with zero keys to whole blocks, once per head, and both products run as
  // brgemm. Elsewhere K^T is plain and P @ V goes through oneDNN's matmul (about
  // twice brgemm's rate without AMX).
  const bool vnni = at::native::cpublas::could_pack(at::kBFloat16) && D % 2 == 0 && D <= kKB;
  const int64_t nkb = (L + kKB - 1) / kKB, Le = nkb * kKB;
  std::vector<at::Tensor> kt(hk), vh(hk);
  for (int64_t h = 0; h < hk; ++h) {
    if (!vnni) {
      kt[h] = keys.select(1, h).t().contiguous();  // [D, L]
      vh[h] = values.select(1, h).contiguous();    // [L, D]
      continue;
    }
    auto ktpad = at::zeros({D, Le}, keys.options());
    ktpad.narrow(1, 0, L).copy_(keys.select(1, h).t());
    auto vpad = at::zeros({Le, D}, values.options());
    vpad.narrow(0, 0, L).copy_(values.select(1, h));
    kt[h] = at::empty({nkb * D * kKB}, keys.options());
    vh[h] = at::empty({Le * D}, values.options());
    for (int64_t c = 0; c < nkb; ++c)
      at::native::cpublas::pack(D, kKB, Le, kKB, at::kBFloat16, at::kBFloat16,
                                ktpad.data_ptr<at::BFloat16>() + c * kKB, kt[h].data_ptr<at::BFloat16>() + c * D * kKB);
    at::native::cpublas::pack(Le, D, D, D, at::kBFloat16, at::kBFloat16, vpad.data_ptr(), vh[h].data_ptr());
  }
  const at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  // Task t: KV head t % hk, query block zigzag(t / hk) (0, nb-1, 1, nb-2, ...), so
  // that the contiguous halves parallel_for hands out carry similar causal work.
  at::parallel_for(0, hk * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> qbuf(G * BQ * D);
    std::vector<float> sbuf(G * BQ * Le);
    std::vector<float> obuf(vnni ? G * BQ * D : 0), rsum(vnni ? G * BQ : 0);
    auto pbuf = at::empty({G * BQ * Le}, q.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % hk, i = t / hk;
      const int64_t blk = (i % 2 == 0) ? i / 2 : nb - 1 - i / 2;
      const int64_t s0 = blk * BQ, bq = std::min(BQ, n - s0), M = G * bq, kend = p + s0 + bq;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < bq; ++j)
          std::copy_n(qp + (s0 + j) * qs0 + (h * G + g) * qs1, D, qbuf.data() + (g * bq + j) * D);
      at::BFloat16* pp = pbuf.data_ptr<at::BFloat16>();
      if (vnni) {
        const int64_t kblocks = (kend + kKB - 1) / kKB, kpad = kblocks * kKB;  // P's row length
        const at::BFloat16* ktp = kt[h].data_ptr<at::BFloat16>();
        for (int64_t c = 0; c < kblocks; ++c)
          at::native::cpublas::brgemm(M, kKB, D, D, kKB, kpad, false, qbuf.data(), ktp + c * D * kKB,
                                      sbuf.data() + c * kKB, true);
        // unnormalised probabilities (exp of the shifted scores, at most 1) in
        // bf16, one pass per row; each output row is divided by its sum after P @ V
        for (int64_t r = 0; r < M; ++r) {
          const int64_t visible = p + s0 + r % bq + 1;
          at::BFloat16* pr = pp + r * kpad;
          const float* sr = sbuf.data() + r * kpad;
          rsum[r] = exp_shifted_to_bf16(sr, pr, visible, row_max(sr, visible) * scale, scale);
          std::fill(pr + visible, pr + kpad, at::BFloat16(0.f));
        }
        at::native::cpublas::brgemm(M, D, kpad, kpad, D, D, false, pp, vh[h].data_ptr<at::BFloat16>(),
                                    obuf.data(), true);
        using fVec = at::vec::Vectorized<float>;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t j = 0; j < bq; ++j) {
            const int64_t r = g * bq + j;
            const float* src = obuf.data() + r * D;
            at::BFloat16* dst = op + (s0 + j) * os0 + (h * G + g) * os1;
            const fVec inv(1.f / rsum[r]);
            int64_t d = 0;
            for (; d + 2 * fVec::size() <= D; d += 2 * fVec::size())
              at::vec::convert_float_bfloat16(fVec::loadu(src + d) * inv, fVec::loadu(src + d + fVec::size()) * inv)
                  .store(dst + d);
            for (; d < D; ++d) dst[d] = at::BFloat16(src[d] / rsum[r]);
          }
        continue;
      }
      at::native::cpublas::brgemm(M, kend, D, D, L, kend, false, qbuf.data(), kt[h].data_ptr<at::BFloat16>(),
                                  sbuf.data(), false);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t visible = p + s0 + r % bq + 1;
        at::BFloat16* pr = pp + r * kend;
        softmax_to_bf16(sbuf.data() + r * kend, pr, visible, scale);
        std::fill(pr + visible, pr + kend, at::BFloat16(0.f));
      }
      auto o = at::mm(pbuf.narrow(0, 0, M * kend).view({M, kend}), vh[h].narrow(0, 0, kend));
      const at::BFloat16* ob = o.data_ptr<at::BFloat16>();
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < bq; ++j)
          std::copy_n(ob + (g * bq + j) * D, D, op + (s0 + j) * os0 + (h * G + g) * os1);
    }
    at::native::cpublas::brgemm_release(vnni);
  });
}

}  // namespace

at::Tensor extend_attention(at::Tensor q, at::Tensor k, const at::Tensor& v, const at::Tensor& positions,
                            const at::Tensor& cos_sin_cache, at::Tensor k_cache, at::Tensor v_cache,
                            const at::Tensor& out_loc, const at::Tensor& req_to_token,
                            const at::Tensor& req_pool_indices, const std::vector<int64_t>& prefix_lens,
                            const std::vector<int64_t>& extend_lens, double scale) {
  TORCH_CHECK(prefix_lens.size() == extend_lens.size(), "prefix_lens and extend_lens differ in length");
  TORCH_CHECK(req_pool_indices.scalar_type() == at::kLong && req_pool_indices.dim() == 1 &&
                  req_pool_indices.size(0) == static_cast<int64_t>(extend_lens.size()),
              "req_pool_indices must be int64 [B]");
  TORCH_CHECK(req_to_token.dim() == 2, "req_to_token must be [rows, context]");
  int64_t total = 0;
  for (auto n : extend_lens) total += n;
  TORCH_CHECK(total == q.size(0), "extend_lens must sum to the number of tokens");
  rope_and_store(q, k, v, positions, cos_sin_cache, k_cache, v_cache, out_loc);

  const bool gqa = q.size(1) != k.size(1);
  // bf16 takes the blocked path (fp32 scores through brgemm); fp32 keeps SDPA.
  const bool blocked = q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                       q.size(1) % k.size(1) == 0;
  auto out = at::empty_like(q);
  auto rows = req_pool_indices.accessor<int64_t, 1>();
  int64_t start = 0;
  for (size_t b = 0; b < extend_lens.size(); ++b) {
    const int64_t n = extend_lens[b], p = prefix_lens[b];
    if (n == 0) continue;
    TORCH_CHECK(p >= 0 && p + n <= req_to_token.size(1), "sequence longer than req_to_token");
    at::Tensor ki, vi;
    if (p == 0) {  // the whole sequence is in this call: attend to the fresh K/V
      ki = k.narrow(0, start, n);
      vi = v.narrow(0, start, n);
    } else {
      auto slots = req_to_token[rows[b]].narrow(0, 0, p + n).to(at::kLong);
      ki = k_cache.index_select(0, slots);
      vi = v_cache.index_select(0, slots);
    }
    if (blocked && p + n >= BQ) {  // a few fresh tokens are as fast through SDPA
      blocked_causal_bf16(q.narrow(0, start, n), ki, vi, p, static_cast<float>(scale), out.narrow(0, start, n));
      start += n;
      continue;
    }
    auto qi = q.narrow(0, start, n).transpose(0, 1).unsqueeze(0);  // [1, Hq, n, D]
    std::optional<at::Tensor> mask;
    if (p > 0)  // query j (position p + j) sees keys 0 .. p + j
      mask = at::arange(p + n).unsqueeze(0) <= (at::arange(n) + p).unsqueeze(1);
    // 4-D [1, H, n, D] inputs: the CPU flash kernel takes only 4-D.
    auto oi = at::scaled_dot_product_attention(qi, ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0),
                                               mask, 0.0, /*is_causal=*/p == 0, scale, gqa);
    out.narrow(0, start, n).copy_(oi[0].transpose(0, 1));
    start += n;
  }
  return out;
}
