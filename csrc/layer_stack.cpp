// A forward's decoder layers in one native call. Each layer is the same op
// sequence as models/llama.py's DecoderLayer (RMSNorm, grouped QKV linear, RoPE +
// KV store + attention (decode or extend), O linear, residual, RMSNorm, gate/up
// linear, SwiGLU, down linear, residual), calling the same kernels, so its output
// is bit for bit the Python path's; what it removes is the ~100 Python-level
// operations per layer that cost 5-10 ms of a 30-layer batch-16 decode step on a
// 2-core CPU (and as much of a short extend over a cached prefix).
#include "ops.h"

#include <memory>
#include <utility>
#include <vector>

namespace {

// out[rows[g]] = x[rows[g]] @ w[g]^T + b[g]; groups marked native run in one
// grouped-kernel call, the others (more rows than the kernel serves) through
// torch's matmul. No rows: one member runs every row through torch's matmul.
at::Tensor linear_groups(const at::Tensor& x, const std::vector<at::Tensor>& w,
                         const std::vector<c10::optional<at::Tensor>>& b, const std::vector<at::Tensor>& rows,
                         const std::vector<bool>& native) {
  if (rows.empty()) return at::linear(x, w[0], b[0]);
  std::vector<at::Tensor> nw, nr;
  std::vector<c10::optional<at::Tensor>> nb;
  for (size_t g = 0; g < rows.size(); ++g) {
    if (native[g]) {
      nw.push_back(w[g]);
      nb.push_back(b[g]);
      nr.push_back(rows[g]);
    }
  }
  at::Tensor out = nw.empty() ? at::empty({x.size(0), w[0].size(0)}, x.options()) : grouped_linear(x, nw, nb, nr);
  for (size_t g = 0; g < rows.size(); ++g) {
    if (!native[g]) out.index_copy_(0, rows[g], at::linear(x.index_select(0, rows[g]), w[g], b[g]));
  }
  return out;
}

// out[rows] += x[rows] @ a^T @ b^T (a LoRA adapter's update of one projection), as
// lora/batch.py: few rows through the grouped kernel, more through torch's matmul.
void add_lora(at::Tensor& out, const at::Tensor& x, const at::Tensor& rows, const at::Tensor& a,
              const at::Tensor& b, int64_t max_grouped_rows) {
  const at::Tensor xr = x.index_select(0, rows);
  at::Tensor delta;
  if (rows.numel() <= max_grouped_rows) {
    const std::vector<at::Tensor> whole{at::arange(rows.numel(), rows.options().dtype(at::kLong))};
    const std::vector<c10::optional<at::Tensor>> none{c10::nullopt};
    delta = grouped_linear(grouped_linear(xr, {a}, none, whole), {b}, none, whole);
  } else {
    delta = at::matmul(at::matmul(xr, a.t()), b.t());
  }
  out.index_add_(0, rows, delta.to(out.scalar_type()));
}

}  // namespace

LoRAStack::LoRAStack(std::vector<std::vector<c10::optional<at::Tensor>>> layers) {
  for (auto& l : layers) {
    TORCH_CHECK(l.size() == 2 * kLoRAModules, "each layer takes (A, B) or (None, None) per projection");
    for (size_t i = 0; i < l.size(); i += 2)
      TORCH_CHECK(l[i].has_value() == l[i + 1].has_value(), "a projection's A and B come together");
  }
  layers_ = std::move(layers);
}

void LoRAStack::apply(at::Tensor& out, const at::Tensor& x, const at::Tensor& rows, int64_t layer, int module,
                      int64_t max_grouped_rows) const {
  if (layer >= static_cast<int64_t>(layers_.size())) return;
  const auto& a = layers_[layer][2 * module];
  if (a.has_value()) add_lora(out, x, rows, *a, *layers_[layer][2 * module + 1], max_grouped_rows);
}

LayerStack::LayerStack(std::vector<std::vector<at::Tensor>> layers, std::vector<int64_t> segments,
                       int64_t members, bool has_bias, int64_t num_heads, int64_t num_kv_heads,
                       int64_t head_dim, double eps)
    : members_(members), num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps),
      segments_(std::move(segments)) {
  TORCH_CHECK(members >= 1 && layers.size() == segments_.size(), "one segment per layer, at least one member");
  const size_t per_layer = 2 + 4 * members + (has_bias ? members : 0);
  for (auto& t : layers) {
    TORCH_CHECK(t.size() == per_layer, "each layer takes 2 norms, 4 linears per member and the QKV biases");
    Layer l;
    l.ln1 = t[0];
    l.ln2 = t[1];
    for (int64_t m = 0; m < members; ++m) {
      l.qkv.push_back(t[2 + m]);
      l.o.push_back(t[2 + members + m]);
      l.gate_up.push_back(t[2 + 2 * members + m]);
      l.down.push_back(t[2 + 3 * members + m]);
      l.qkv_bias.push_back(has_bias ? c10::optional<at::Tensor>(t[2 + 4 * members + m]) : c10::nullopt);
      l.none.push_back(c10::nullopt);
    }
    layers_.push_back(std::move(l));
  }
}

at::Tensor LayerStack::run(at::Tensor hidden, int64_t start, int64_t end, const std::vector<at::Tensor>& rows,
                          const std::vector<bool>& native, const c10::optional<at::Tensor>& row_group,
                          const at::Tensor& positions, const at::Tensor& cos_sin, const at::Tensor& k_pool,
                          const at::Tensor& v_pool, const at::Tensor& out_cache_loc,
                          const at::Tensor& req_to_token, const at::Tensor& req_pool_indices,
                          const at::Tensor& seq_lens, const std::vector<int64_t>& prefix_lens,
                          const std::vector<int64_t>& extend_lens, bool decode, double scale,
                          const std::vector<std::shared_ptr<LoRAStack>>& loras,
                          const std::vector<at::Tensor>& lora_rows, int64_t max_grouped_rows,
                          const c10::optional<at::Tensor>& e_cache, const std::vector<int64_t>& e_index,
                          const c10::optional<at::Tensor>& e_loc) const {
  TORCH_CHECK(loras.size() == lora_rows.size(), "one row index per LoRA adapter");
  TORCH_CHECK(!e_cache.has_value() || (e_loc.has_value() && e_index.size() == layers_.size()),
              "an E cache needs its rows and one index (or -1) per layer");
  // each adapter's update after the projection it belongs to (lora/batch.py's order)
  auto lora = [&](at::Tensor& out, const at::Tensor& x, int64_t layer, int module) {
    for (size_t k = 0; k < loras.size(); ++k) loras[k]->apply(out, x, lora_rows[k], layer, module, max_grouped_rows);
  };
  TORCH_CHECK(0 <= start && start <= end && end <= static_cast<int64_t>(layers_.size()), "bad layer span");
  TORCH_CHECK(rows.size() == native.size() && (rows.empty() || static_cast<int64_t>(rows.size()) == members_),
              "one row index and one kernel choice per member");
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [T, H]");
  const int64_t T = hidden.size(0), q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
  at::Tensor residual;  // the last layer's MLP output, added together with the next norm
  for (int64_t i = start; i < end; ++i) {
    const Layer& l = layers_[i];
    const int64_t seg = segments_[i];
    at::Tensor x;
    if (residual.defined()) {
      std::tie(hidden, x) = add_rmsnorm(hidden, residual, l.ln1, row_group, eps_);
    } else {
      x = rmsnorm(hidden, l.ln1, row_group, eps_);
    }
    if (e_cache.has_value() && e_index[i] >= 0)  // the stream entering layer i, as HiddenPool.store keeps it
      e_cache->select(0, e_index[i]).index_copy_(0, e_loc->select(0, e_index[i]), hidden.to(e_cache->scalar_type()));
    at::Tensor qkv = linear_groups(x, l.qkv, l.qkv_bias, rows, native);
    lora(qkv, x, i, 0);
    at::Tensor q = qkv.narrow(1, 0, q_size).view({T, num_heads_, head_dim_});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads_, head_dim_});
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads_, head_dim_});
    at::Tensor k_cache = k_pool.select(0, i), v_cache = v_pool.select(0, i);
    at::Tensor attn;
    if (decode) {
      rope_and_store(q, k, v, positions, cos_sin, k_cache, v_cache, out_cache_loc.select(0, seg));
      attn = decode_attention(q, k_cache, v_cache, req_to_token.select(0, seg), req_pool_indices, seq_lens, scale);
    } else {
      attn = extend_attention(q, k, v, positions, cos_sin, k_cache, v_cache, out_cache_loc.select(0, seg),
                              req_to_token.select(0, seg), req_pool_indices, prefix_lens, extend_lens, scale);
    }
    attn = attn.reshape({T, q_size});
    at::Tensor o = linear_groups(attn, l.o, l.none, rows, native);
    lora(o, attn, i, 1);
    std::tie(hidden, x) = add_rmsnorm(hidden, o, l.ln2, row_group, eps_);
    at::Tensor gate_up = linear_groups(x, l.gate_up, l.none, rows, native);
    lora(gate_up, x, i, 2);
    at::Tensor h = silu_and_mul(gate_up);
    at::Tensor down = linear_groups(h, l.down, l.none, rows, native);
    lora(down, h, i, 3);
    residual = down;
  }
  return residual.defined() ? hidden + residual : hidden;
}
