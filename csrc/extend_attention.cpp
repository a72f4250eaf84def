// Extend (prefill) attention over the slot pool, fused with RoPE and the KV store:
// one call per layer for a ragged batch. Request b's queries sit at positions
// prefix_lens[b] .. prefix_lens[b] + extend_lens[b] - 1 and see every key of its
// sequence up to their own position, read from the pool through req_to_token.
// The cross-model recompute of a layer span over a stored prefix runs through it
// (its prefix is the part of the span already recomputed plus the receiver's own).
#include "ops.h"

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
  auto out = at::empty_like(q);
  auto rows = req_pool_indices.accessor<int64_t, 1>();
  int64_t start = 0;
  for (size_t b = 0; b < extend_lens.size(); ++b) {
    const int64_t n = extend_lens[b], p = prefix_lens[b];
    if (n == 0) continue;
    TORCH_CHECK(p >= 0 && p + n <= req_to_token.size(1), "sequence longer than req_to_token");
    auto qi = q.narrow(0, start, n).transpose(0, 1).unsqueeze(0);  // [1, Hq, n, D]
    at::Tensor ki, vi;
    std::optional<at::Tensor> mask;
    if (p == 0) {  // the whole sequence is in this call: attend to the fresh K/V
      ki = k.narrow(0, start, n);
      vi = v.narrow(0, start, n);
    } else {
      auto slots = req_to_token[rows[b]].narrow(0, 0, p + n).to(at::kLong);
      ki = k_cache.index_select(0, slots);
      vi = v_cache.index_select(0, slots);
      // query j (position p + j) sees keys 0 .. p + j
      mask = at::arange(p + n).unsqueeze(0) <= (at::arange(n) + p).unsqueeze(1);
    }
    // 4-D [1, H, n, D] inputs: the CPU flash kernel takes only 4-D.
    auto oi = at::scaled_dot_product_attention(qi, ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0),
                                               mask, 0.0, /*is_causal=*/p == 0, scale, gqa);
    out.narrow(0, start, n).copy_(oi[0].transpose(0, 1));
    start += n;
  }
  return out;
}
