#pragma once
#include <torch/extension.h>

// See python/droidspeak/kernels/reference.py for the semantics of each op.

void rope_and_store(at::Tensor q, at::Tensor k, const at::Tensor& v, const at::Tensor& positions,
                    const at::Tensor& cos_sin_cache, at::Tensor k_cache, at::Tensor v_cache,
                    const at::Tensor& out_loc);

at::Tensor extend_attention(at::Tensor q, at::Tensor k, const at::Tensor& v, const at::Tensor& positions,
                            const at::Tensor& cos_sin_cache, at::Tensor k_cache, at::Tensor v_cache,
                            const at::Tensor& out_loc, const at::Tensor& req_to_token,
                            const at::Tensor& req_pool_indices, const std::vector<int64_t>& prefix_lens,
                            const std::vector<int64_t>& extend_lens, double scale);

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& req_to_token, const at::Tensor& req_pool_indices,
                            const at::Tensor& seq_lens, double scale);

// Small-query attention on AMX tiles over pool slots (decode_attention.cpp; only where
// amx.h's DS_HAVE_AMX is set): request b's query tokens are q rows
// [sum of extend_lens before b, + extend_lens[b]), token t of them attends to its
// keys [0, prefix_lens[b] + t], K/V read through req_to_token row rows[b]. Serves
// decode (one token per request) and extends of a few tokens over a cached prefix.
bool attend_amx_supported(const at::Tensor& q, const at::Tensor& k_cache);
void attend_amx(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& req_to_token, const int64_t* rows, const std::vector<int64_t>& prefix_lens,
                const std::vector<int64_t>& extend_lens, float scale, at::Tensor& out);

// Grouped bf16 linear (grouped_linear.cpp): out[rows[g]] = x[rows[g]] @ weights[g]^T + biases[g].
at::Tensor grouped_linear(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                          const std::vector<c10::optional<at::Tensor>>& biases,
                          const std::vector<at::Tensor>& rows);
bool amx_available();  // whether grouped_linear runs on AMX tiles (K % 32 == 0, N % 16 == 0)

// Row-wise decoder ops (norm_act.cpp): RMSNorm with one weight row per group of rows
// (row_group) or one weight for all, and silu(gate) * up over a fused [T, 2 * I] input.
at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& row_group,
                   double eps);
// (x + delta, rmsnorm(x + delta)): a residual add and the norm after it in one pass,
// the sum rounded as torch's add rounds it (the same values as the two ops).
std::tuple<at::Tensor, at::Tensor> add_rmsnorm(const at::Tensor& x, const at::Tensor& delta,
                                               const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& row_group, double eps);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
// Index of each row's first maximum (a NaN counts as the maximum), as torch.max(-1).indices.
at::Tensor argmax_rows(const at::Tensor& x);

// rANS entropy coder (rans.cpp): `symbols` int32 in segments of `seg_lens`, segment s coded
// with frequency table s (int32, summing to 2^15) of `freqs`, split by `table_lens`.
at::Tensor rans_encode(const at::Tensor& symbols, const at::Tensor& seg_lens, const at::Tensor& freqs,
                       const at::Tensor& table_lens);
at::Tensor fp32_to_bf16(const at::Tensor& x);  // single-threaded, for the codec's threads
at::Tensor rans_decode(const at::Tensor& data, const at::Tensor& seg_lens, const at::Tensor& freqs,
                       const at::Tensor& table_lens);
// A codec profile's transforms of layers [first, first + L) (codec_transform.cpp):
// forward: (x - centre) @ mats, else x @ mats + centre, per layer's K and V half.
at::Tensor codec_transform(const at::Tensor& x, const at::Tensor& mats, const at::Tensor& centre, int64_t first,
                           bool forward);
// Reconstruction of the codec's lossy levels from their symbol rows (rans.cpp).
at::Tensor cachegen_dequantize(const at::Tensor& anchors, const at::Tensor& deltas, const at::Tensor& a_index,
                               const at::Tensor& d_index, const at::Tensor& mean,
                               const at::Tensor& anchor_step, const at::Tensor& delta_step, int64_t group,
                               int64_t T);

// How many LayerStack runs so far took the decode team (layer_stack.cpp).
int64_t decode_team_steps();

// A forward's decoder layers [start, end) in one call (layer_stack.cpp), for the
// members of a co-batched family: per layer, [ln1, ln2, qkv x M, o x M, gate_up x M,
// down x M, (qkv bias x M)]; a norm weight is [H] for one member, else [M, H] picked
// per row by row_group. `rows`/`native`: each member's rows and whether they run on
// the grouped kernel (empty: one member, torch's matmul). `decode`: one token per
// request (rope_and_store + decode_attention), else a ragged extend
// (extend_attention over prefix_lens / extend_lens). `loras[k]` adds its updates to
// rows `lora_rows[k]` (through the grouped kernel up to max_grouped_rows rows).
// `e_cache` ([E, rows, H], HiddenPool.h): the stream entering layer i is kept at
// rows e_loc[e_index[i]] where e_index[i] >= 0.
// A LoRA adapter's updates for a LayerStack: per layer, (A, B) or (None, None) for
// each of the fused projections qkv, o, gate_up, down (lora/adapter.py's LoRAWeights).
class LoRAStack {
 public:
  static constexpr int kLoRAModules = 4;
  explicit LoRAStack(std::vector<std::vector<c10::optional<at::Tensor>>> layers);
  void apply(at::Tensor& out, const at::Tensor& x, const at::Tensor& rows, int64_t layer, int module,
             int64_t max_grouped_rows) const;

 private:
  std::vector<std::vector<c10::optional<at::Tensor>>> layers_;
};

class LayerStack {
 public:
  LayerStack(std::vector<std::vector<at::Tensor>> layers, std::vector<int64_t> segments, int64_t members,
             bool has_bias, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps);
  at::Tensor run(at::Tensor hidden, int64_t start, int64_t end, const std::vector<at::Tensor>& rows,
                 const std::vector<bool>& native, const c10::optional<at::Tensor>& row_group,
                 const at::Tensor& positions, const at::Tensor& cos_sin, const at::Tensor& k_pool,
                 const at::Tensor& v_pool, const at::Tensor& out_cache_loc, const at::Tensor& req_to_token,
                 const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                 const std::vector<int64_t>& prefix_lens, const std::vector<int64_t>& extend_lens, bool decode,
                 double scale, const std::vector<std::shared_ptr<LoRAStack>>& loras,
                 const std::vector<at::Tensor>& lora_rows, int64_t max_grouped_rows,
                 const c10::optional<at::Tensor>& e_cache, const std::vector<int64_t>& e_index,
                 const c10::optional<at::Tensor>& e_loc) const;

 private:
  // A decode step's (or, on AMX, an extend's of at most the grouped kernel's
  // rows) layers in one parallel region where the kernels allow it (AMX tiles, or AVX512-BF16 dot products,
  // for every linear and the attention; no LoRA, no E cache); false (hidden
  // untouched) when they do not.
  bool decode_team(at::Tensor& hidden, int64_t start, int64_t end, const std::vector<at::Tensor>& rows,
                   const std::vector<bool>& native, const c10::optional<at::Tensor>& row_group,
                   const at::Tensor& positions, const at::Tensor& cos_sin, const at::Tensor& k_pool,
                   const at::Tensor& v_pool, const at::Tensor& out_cache_loc, const at::Tensor& req_to_token,
                   const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                   const std::vector<int64_t>& prefix_lens, const std::vector<int64_t>& extend_lens, bool decode,
                   double scale) const;
  struct Layer {
    at::Tensor ln1, ln2;
    std::vector<at::Tensor> qkv, o, gate_up, down;
    std::vector<c10::optional<at::Tensor>> qkv_bias, none;
  };
  std::vector<Layer> layers_;
  int64_t members_, num_heads_, num_kv_heads_, head_dim_;
  double eps_;
  std::vector<int64_t> segments_;
};
