// A forward's decoder layers in one native call. Each layer is the same op
// sequence as models/llama.py's DecoderLayer (RMSNorm, grouped QKV linear, RoPE +
// KV store + attention (decode or extend), O linear, residual, RMSNorm, gate/up
// linear, SwiGLU, down linear, residual), calling the same kernels, so its output
// is bit for bit the Python path's; what it removes is the Python-level work per
// layer, a large share of a decode step on a small model (docs/kernels.md).
#include "ops.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "rowops.h"
#include "team.h"

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

#ifdef DS_HAVE_AVX512BF16
namespace {

std::atomic<int64_t> team_steps{0};

// DROIDSPEAK_NO_DECODE_TEAM=1 runs decode steps kernel by kernel (to compare).
bool team_enabled() {
  const char* off = std::getenv("DROIDSPEAK_NO_DECODE_TEAM");
  return !(off && *off && std::strcmp(off, "0") != 0);
}

const uint16_t* u16(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* u16(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

// [begin, end) of `total` items for thread `tid` of `n`, in contiguous chunks.
inline void share(int64_t total, int tid, int n, int64_t& begin, int64_t& end) {
  const int64_t chunk = (total + n - 1) / n;
  begin = std::min(total, tid * chunk);
  end = std::min(total, begin + chunk);
}

}  // namespace

// A decode step's layers (or, on AMX, an extend's of at most the grouped
// kernel's rows: AmxAttention's tiles for at most kAmxSmallExtend tokens per
// request, the blocked attention past that, as extend_attention picks them)
// inside one parallel region (the decode team): every
// phase of a layer (the row-wise ops, packing rows for the tiles, a linear's
// tasks, RoPE + store, attention's tasks) is split between the threads, with a
// barrier between phases. Run kernel by kernel, a batch-16 step on two cores
// left the second thread idle for a third of the step while the first ran the
// row-wise ops (norms, SwiGLU, RoPE, packing) between ~5 parallel regions per
// layer. Each phase calls the work items that the standalone kernels call
// (rowops.h, team.h), so outputs are bit-identical to the kernel-by-kernel run:
// on AMX tiles (decode steps and short extends), or, where the CPU has no AMX,
// on the AVX512-BF16 kernels (decode steps; the linears in tasks of 32 features,
// an even split of this model family's widths, where the standalone op's 64
// left one thread a ninth of the work more).
bool LayerStack::decode_team(at::Tensor& hidden, int64_t start, int64_t end, const std::vector<at::Tensor>& rows,
                             const std::vector<bool>& native, const c10::optional<at::Tensor>& row_group,
                             const at::Tensor& positions, const at::Tensor& cos_sin, const at::Tensor& k_pool,
                             const at::Tensor& v_pool, const at::Tensor& out_cache_loc,
                             const at::Tensor& req_to_token, const at::Tensor& req_pool_indices,
                             const at::Tensor& seq_lens, const std::vector<int64_t>& prefix_lens,
                             const std::vector<int64_t>& extend_lens, bool decode, double scale) const {
  const int64_t T = hidden.size(0), H = hidden.size(1), hq = num_heads_, hkv = num_kv_heads_, D = head_dim_;
  const int64_t q_size = hq * D, kv_size = hkv * D, qkv_n = q_size + 2 * kv_size;
  if (rows.empty() || end <= start || !team_enabled() || hidden.scalar_type() != at::kBFloat16) return false;
  if (std::find(native.begin(), native.end(), false) != native.end()) return false;
  const int64_t I2 = layers_[start].gate_up[0].size(0), I = I2 / 2;
  if (k_pool.scalar_type() != at::kBFloat16 || positions.scalar_type() != at::kLong ||
      cos_sin.scalar_type() != at::kFloat || !cos_sin.is_contiguous() || cos_sin.size(1) != D ||
      req_to_token.scalar_type() != at::kInt || !req_to_token.is_contiguous() || !k_pool.is_contiguous() ||
      !v_pool.is_contiguous() || hq % hkv != 0)
    return false;
  // The kernels the standalone ops would pick: AMX tiles for every linear and
  // the attention, or (decode only) AVX512-BF16 for all of them; a mix runs
  // kernel by kernel.
  const int64_t kn[4][2] = {{H, qkv_n}, {q_size, H}, {H, I2}, {I, H}};
  int amx_linears = 0;
  for (const auto& [k, n] : kn) amx_linears += grouped_linear_uses_amx(k, n);
#ifdef DS_HAVE_AMX
  const bool attn_amx = AmxAttention::supported(hq, hkv, D);
#else
  const bool attn_amx = false;
#endif
  const bool amx = amx_linears == 4 && attn_amx;
  if (!amx && !(decode && amx_linears == 0 && !attn_amx && vec_decode_supported(hq / hkv, D))) return false;
  // requests: a decode step's one token each, or an extend (on AMX) that
  // extend_attention would run on the same kernels: at most kAmxSmallExtend
  // tokens per request on AmxAttention's tiles, or, past that, every request
  // through the blocked attention (none short enough for its SDPA path)
  const int64_t B = decode ? T : static_cast<int64_t>(extend_lens.size());
  if (req_pool_indices.numel() != B || (!decode && prefix_lens.size() != extend_lens.size())) return false;
  bool blocked = false;
  if (!decode) {
    int64_t total = 0, longest = 0;
    bool all_fit = true;
    for (size_t b = 0; b < extend_lens.size(); ++b) {
      total += extend_lens[b];
      longest = std::max(longest, extend_lens[b]);
      all_fit = all_fit && (extend_lens[b] == 0 || BlockedAttention::fits(prefix_lens[b], extend_lens[b]));
    }
    if (total != T || !amx) return false;
    blocked = longest > kAmxSmallExtend;
    if (blocked && !all_fit) return false;  // a request for SDPA
  }
  for (int64_t i = start; i < end; ++i) {
    const Layer& l = layers_[i];
    for (size_t m = 0; m < rows.size(); ++m) {
      const std::pair<const at::Tensor*, std::pair<int64_t, int64_t>> shapes[] = {
          {&l.qkv[m], {qkv_n, H}}, {&l.o[m], {H, q_size}}, {&l.gate_up[m], {I2, H}}, {&l.down[m], {H, I}}};
      for (const auto& [w, nk] : shapes)
        if (w->dim() != 2 || w->size(0) != nk.first || w->size(1) != nk.second || !w->is_contiguous() ||
            w->scalar_type() != at::kBFloat16)
          return false;
      if (l.qkv_bias[m].has_value() &&
          (l.qkv_bias[m]->numel() != qkv_n || !l.qkv_bias[m]->is_contiguous() ||
           l.qkv_bias[m]->scalar_type() != at::kBFloat16))
        return false;
    }
    for (const at::Tensor* ln : {&l.ln1, &l.ln2})
      if (ln->scalar_type() != at::kBFloat16 || !ln->is_contiguous() || ln->size(-1) != H) return false;
  }
  // every row in exactly one group
  const int64_t G = static_cast<int64_t>(rows.size());
  std::vector<at::Tensor> row_idx(G);
  std::vector<int64_t> rn(G);
  std::vector<bool> seen(T, false);
  for (int64_t g = 0; g < G; ++g) {
    row_idx[g] = rows[g].to(at::kLong).contiguous();
    rn[g] = row_idx[g].numel();
    const int64_t* r = row_idx[g].data_ptr<int64_t>();
    for (int64_t m = 0; m < rn[g]; ++m) {
      if (r[m] < 0 || r[m] >= T || seen[r[m]]) return false;
      seen[r[m]] = true;
    }
  }
  if (std::find(seen.begin(), seen.end(), false) != seen.end()) return false;
  at::Tensor rg;
  const int64_t* rgp = nullptr;
  if (row_group.has_value()) {
    rg = row_group->to(at::kLong).contiguous();
    TORCH_CHECK(rg.numel() == T, "one group per row");
    rgp = rg.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(rgp[t] >= 0 && rgp[t] < layers_[start].ln1.size(0), "row group out of range");
  } else {
    TORCH_CHECK(layers_[start].ln1.numel() == H, "norm weight must be [H]");
  }
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous(), req_rows = req_pool_indices.to(at::kLong).contiguous();
  const at::Tensor pos = positions.contiguous(), loc = out_cache_loc.to(at::kLong).contiguous();
  const int64_t width = req_to_token.size(2), slots = k_pool.size(1);
  std::vector<int64_t> prefix(B), extend(B, 1);
  for (int64_t b = 0; b < B; ++b) {
    if (decode) {
      prefix[b] = lens.data_ptr<int64_t>()[b] - 1;
    } else {
      prefix[b] = prefix_lens[b];
      extend[b] = extend_lens[b];
    }
    TORCH_CHECK(prefix[b] >= 0 && extend[b] >= 0 && prefix[b] + extend[b] <= width, "sequence length out of range");
  }
  const int64_t* locp = loc.data_ptr<int64_t>();
  for (int64_t i = 0; i < loc.numel(); ++i) TORCH_CHECK(locp[i] >= 0 && locp[i] < slots, "cache slot out of range");
#ifdef DS_HAVE_AMX
  std::unique_ptr<AmxAttention> amx_attn;
  if (amx && !blocked)
    amx_attn = std::make_unique<AmxAttention>(hq, hkv, D, req_rows.data_ptr<int64_t>(), prefix, extend,
                                              static_cast<float>(scale));
#endif
  // the blocked attention's requests (those with tokens), their first rows, their
  // units' starts in the pack and task lists, and each one's keys per layer (slot
  // offsets as extend_attention reads them: the pool rows, fresh tokens included)
  std::vector<std::unique_ptr<BlockedAttention>> battn;
  std::vector<int64_t> b_row, b_pack{0}, b_task{0};
  std::vector<std::vector<std::vector<int64_t>>> b_off;  // [segment][request]: K and V alike
  std::vector<std::vector<KVRows>> b_kv;                 // [layer - start][request]
  if (blocked) {
    const int threads = at::get_num_threads();
    const int64_t* rr = req_rows.data_ptr<int64_t>();
    for (int64_t b = 0, row = 0; b < B; row += extend[b], ++b) {
      if (extend[b] == 0) continue;
      battn.push_back(std::make_unique<BlockedAttention>(hq, hkv, D, prefix[b], extend[b], static_cast<float>(scale),
                                                         threads, hidden.options()));
      b_row.push_back(row);
      b_pack.push_back(b_pack.back() + battn.back()->pack_units());
      b_task.push_back(b_task.back() + battn.back()->tasks());
    }
    b_kv.resize(end - start);
    b_off.resize(req_to_token.size(0));
    for (int64_t i = start; i < end; ++i) {
      const int64_t seg = segments_[i];
      if (b_off[seg].empty()) {
        for (int64_t b = 0; b < B; ++b) {
          if (extend[b] == 0) continue;
          const int32_t* sl = req_to_token.data_ptr<int32_t>() + (seg * req_to_token.size(1) + rr[b]) * width;
          std::vector<int64_t> o(prefix[b] + extend[b]);
          for (size_t j = 0; j < o.size(); ++j) {
            TORCH_CHECK(sl[j] >= 0 && sl[j] < slots, "req_to_token holds a slot outside the pool");
            o[j] = static_cast<int64_t>(sl[j]) * kv_size;
          }
          b_off[seg].push_back(std::move(o));
        }
      }
      for (const auto& o : b_off[seg]) {
        KVRows kv;
        kv.kbase = reinterpret_cast<const at::BFloat16*>(k_pool.data_ptr()) + i * slots * kv_size;
        kv.vbase = reinterpret_cast<const at::BFloat16*>(v_pool.data_ptr()) + i * slots * kv_size;
        kv.koff = kv.voff = o.data();
        kv.khs = kv.vhs = D;
        b_kv[i - start].push_back(kv);
      }
    }
  }

  // buffers, reused by every layer; each group's packed rows per K
  auto opts = hidden.options();
  at::Tensor h = hidden.clone(at::MemoryFormat::Contiguous), x = at::empty({T, H}, opts), qkv = at::empty({T, qkv_n}, opts);
  at::Tensor att = at::empty({T, hq, D}, opts), o = at::empty({T, H}, opts), gu = at::empty({T, I2}, opts);
  at::Tensor act = at::empty({T, I}, opts), down = at::empty({T, H}, opts);
  std::vector<TileVector<uint32_t>> pk_h(G), pk_q(G), pk_i(G);
#ifdef DS_HAVE_AMX
  for (int64_t g = 0; amx && g < G; ++g) {
    pk_h[g].resize(amx_linear::packed_words(rn[g], H));
    pk_q[g].resize(amx_linear::packed_words(rn[g], q_size));
    pk_i[g].resize(amx_linear::packed_words(rn[g], I));
  }
#endif
  uint16_t *hp = u16(h), *xp = u16(x), *qkvp = u16(qkv), *attp = u16(att), *op = u16(o), *gup = u16(gu),
           *actp = u16(act), *downp = u16(down);
  auto bf = [](uint16_t* p) { return reinterpret_cast<at::BFloat16*>(p); };
  const int64_t* posp = pos.data_ptr<int64_t>();
  const float* csp = cos_sin.data_ptr<float>();
  auto* kpool = reinterpret_cast<at::BFloat16*>(k_pool.data_ptr());
  auto* vpool = reinterpret_cast<at::BFloat16*>(v_pool.data_ptr());
  const int64_t layer_elems = slots * kv_size, seg_elems = req_to_token.size(1) * width;
  const int32_t* tab = req_to_token.data_ptr<int32_t>();
  const float eps = static_cast<float>(eps_);

#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int tid = omp_get_thread_num(), n = omp_get_num_threads();
    int64_t rb, re;
    share(T, tid, n, rb, re);
    // out = src @ w^T (+ bias) per group: this thread's share of the K pairs of
    // every group's rows packed for the tiles, then its share of the N / 32
    // tasks per group
    auto linear = [&](const uint16_t* src, const std::vector<at::Tensor>& w,
                      const std::vector<c10::optional<at::Tensor>>& bias, std::vector<TileVector<uint32_t>>& packed,
                      int64_t K, int64_t N, uint16_t* out) {
      int64_t b, e;
#ifdef DS_HAVE_AMX
      if (amx) {
        share(K / amx_linear::kK, tid, n, b, e);
        for (int64_t g = 0; g < G; ++g)
          amx_linear::pack_rows(src, K, row_idx[g].data_ptr<int64_t>(), rn[g], K, b, e, packed[g].data());
#pragma omp barrier
        const int64_t per = amx_linear::tasks(N);
        share(G * per, tid, n, b, e);
        amx_linear::load_config();
        for (int64_t t = b; t < e; ++t) {
          const int64_t g = t / per;
          amx_linear::task(packed[g].data(), rn[g], u16(w[g]), bias[g].has_value() ? u16(*bias[g]) : nullptr, K,
                           N, t % per, row_idx[g].data_ptr<int64_t>(), out);
        }
#pragma omp barrier
        return;
      }
#endif
      (void)packed;
      const int64_t per = vec_linear::tasks(N);
      share(G * per, tid, n, b, e);
      for (int64_t t = b; t < e; ++t) {
        const int64_t g = t / per;
        vec_linear::task(src, K, row_idx[g].data_ptr<int64_t>(), rn[g], u16(w[g]),
                         bias[g].has_value() ? u16(*bias[g]) : nullptr, K, N, t % per, out);
      }
#pragma omp barrier
    };
    for (int64_t i = start; i < end; ++i) {
      const Layer& l = layers_[i];
      const int64_t seg = segments_[i];
      const auto* ln1 = reinterpret_cast<const at::BFloat16*>(l.ln1.data_ptr());
      const auto* ln2 = reinterpret_cast<const at::BFloat16*>(l.ln2.data_ptr());
      for (int64_t t = rb; t < re; ++t) {  // (the last layer's residual add +) input norm
        if (i > start) add_row(bf(hp + t * H), bf(downp + t * H), H, bf(hp + t * H));
        norm_row(bf(hp + t * H), ln1 + (rgp ? rgp[t] : 0) * H, H, eps, bf(xp + t * H));
      }
#pragma omp barrier
      linear(xp, l.qkv, l.qkv_bias, pk_h, H, qkv_n, qkvp);
      for (int64_t t = rb; t < re; ++t) {  // RoPE, K and V into the pool
        at::BFloat16* row = bf(qkvp + t * qkv_n);
        const int64_t slot = locp[seg * T + t];
        rope_store_token(row, D, hq, row + q_size, D, row + q_size + kv_size, D, hkv, D, csp, posp[t],
                         kpool + i * layer_elems + slot * kv_size, vpool + i * layer_elems + slot * kv_size);
      }
#pragma omp barrier
      if (blocked) {  // every request's K and V packed, then every request's tasks
        int64_t b, e;
        share(b_pack.back(), tid, n, b, e);
        for (size_t r = 0; r < battn.size(); ++r)
          battn[r]->pack(b_kv[i - start][r], std::max(b, b_pack[r]) - b_pack[r], std::min(e, b_pack[r + 1]) - b_pack[r]);
#pragma omp barrier
        share(b_task.back(), tid, n, b, e);
        for (size_t r = 0; r < battn.size(); ++r)
          battn[r]->run(bf(qkvp + b_row[r] * qkv_n), qkv_n, D, bf(attp + b_row[r] * q_size), q_size, D,
                        std::max(b, b_task[r]) - b_task[r], std::min(e, b_task[r + 1]) - b_task[r]);
      } else {
        int64_t b, e;
#ifdef DS_HAVE_AMX
        if (amx) {
          share(amx_attn->tasks(), tid, n, b, e);
          const AmxAttention::Layer io{qkvp, qkv_n, D, u16(k_pool) + i * layer_elems, u16(v_pool) + i * layer_elems,
                                       tab + seg * seg_elems, width, bf(attp), q_size, D};
          amx_attn->run(b, e, io);
        }
#endif
        if (!amx) {
          share(B * hkv, tid, n, b, e);
          vec_decode_tasks(hq / hkv, D, qkvp, qkv_n, D, u16(k_pool) + i * layer_elems, u16(v_pool) + i * layer_elems,
                           hkv, tab + seg * seg_elems, width, req_rows.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                           static_cast<float>(scale), bf(attp), b, e);
        }
      }
#pragma omp barrier
      linear(attp, l.o, l.none, pk_q, q_size, H, op);
      for (int64_t t = rb; t < re; ++t) {  // residual add + post-attention norm
        add_row(bf(hp + t * H), bf(op + t * H), H, bf(hp + t * H));
        norm_row(bf(hp + t * H), ln2 + (rgp ? rgp[t] : 0) * H, H, eps, bf(xp + t * H));
      }
#pragma omp barrier
      linear(xp, l.gate_up, l.none, pk_h, H, I2, gup);
      for (int64_t t = rb; t < re; ++t)  // SwiGLU
        silu_mul_row(bf(gup + t * I2), bf(gup + t * I2 + I), I, bf(actp + t * I));
#pragma omp barrier
      linear(actp, l.down, l.none, pk_i, I, H, downp);
    }
#ifdef DS_HAVE_AMX
    if (amx) _tile_release();
#endif
  }
  hidden = h + down;
  team_steps.fetch_add(1, std::memory_order_relaxed);
  return true;
}
#endif

int64_t decode_team_steps() {
#ifdef DS_HAVE_AVX512BF16
  return team_steps.load(std::memory_order_relaxed);
#else
  return 0;
#endif
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
#ifdef DS_HAVE_AVX512BF16
  if (loras.empty() && !e_cache.has_value() &&
      decode_team(hidden, start, end, rows, native, row_group, positions, cos_sin, k_pool, v_pool, out_cache_loc,
                  req_to_token, req_pool_indices, seq_lens, prefix_lens, extend_lens, decode, scale))
    return hidden;
#endif
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
