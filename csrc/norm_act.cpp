// Row-wise ops of the decoder layer that torch runs as 7-8 small ops each, which
// costs more than the arithmetic at decode batch sizes: RMSNorm (with one weight
// per family member, picked per row) and SwiGLU's silu(gate) * up. Both keep
// torch's roundings (see kernels/reference.py), so they replace the torch
// sequences without changing what a model computes beyond summation order.
#include "ops.h"

#include <ATen/Parallel.h>

#include "rowops.h"

#include <cmath>
#include <limits>

namespace {

// Rows per task: decode batches stay on the calling thread (no team start-up).
constexpr int64_t kRowGrain = 64;

// RMSNorm of x, or with `delta` of x + delta (rounded to the dtype as torch's add
// rounds it, and written to `sum`): the residual add and the next norm in one pass.
template <typename scalar_t>
void rmsnorm_impl(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, const int64_t* row_group,
                  double eps, at::Tensor& out, at::Tensor* sum) {
  const int64_t T = x.size(0), H = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* dp = delta ? delta->data_ptr<scalar_t>() : nullptr;
  scalar_t* sp = sum ? sum->data_ptr<scalar_t>() : nullptr;
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t ldx = x.stride(0), ldd = delta ? delta->stride(0) : 0;
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = xp + t * ldx;
      if (dp) {
        add_row(row, dp + t * ldd, H, sp + t * H);
        row = sp + t * H;
      }
      norm_row(row, wp + (row_group ? row_group[t] : 0) * H, H, eps, op + t * H);
    }
  });
}

template <typename scalar_t>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  const scalar_t* gp = gate_up.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t ld = gate_up.stride(0);
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* g = gp + t * ld;
      silu_mul_row(g, g + I, I, op + t * I);
    }
  });
}

}  // namespace

namespace {

at::Tensor norm(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight,
                const c10::optional<at::Tensor>& row_group, double eps, at::Tensor* sum) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, H] with contiguous rows");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous(), "weight must match x");
  const int64_t H = x.size(1);
  if (delta)
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->stride(1) == 1 && delta->scalar_type() == x.scalar_type(),
                "delta must be x's shape and dtype with contiguous rows");
  at::Tensor groups;
  const int64_t* gp = nullptr;
  if (row_group.has_value()) {
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == H, "per-group weights must be [G, H]");
    groups = row_group->to(at::kLong).contiguous();
    TORCH_CHECK(groups.numel() == x.size(0), "one group per row");
    gp = groups.data_ptr<int64_t>();
    for (int64_t i = 0; i < groups.numel(); ++i)
      TORCH_CHECK(gp[i] >= 0 && gp[i] < weight.size(0), "row group ", gp[i], " out of range");
  } else {
    TORCH_CHECK(weight.numel() == H, "weight must be [H]");
  }
  auto out = at::empty({x.size(0), H}, x.options());
  if (sum) *sum = at::empty({x.size(0), H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rmsnorm", [&] {
    rmsnorm_impl<scalar_t>(x, delta, weight, gp, eps, out, sum);
  });
  return out;
}

}  // namespace

at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& row_group,
                   double eps) {
  return norm(x, nullptr, weight, row_group, eps, nullptr);
}

std::tuple<at::Tensor, at::Tensor> add_rmsnorm(const at::Tensor& x, const at::Tensor& delta,
                                               const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& row_group, double eps) {
  at::Tensor sum;
  at::Tensor out = norm(x, &delta, weight, row_group, eps, &sum);
  return {sum, out};
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) > 0,
              "x must be a non-empty float32 [B, V] with contiguous rows");
  const int64_t B = x.size(0), V = x.size(1), ld = x.stride(0);
  auto out = at::empty({B}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  // a row per task: a greedy decode batch's logits are a few MB, two threads read them
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* row = xp + b * ld;
      int64_t i = 0, nan_at = -1;
      float best = -std::numeric_limits<float>::infinity();
#ifdef CPU_CAPABILITY_AVX512
      __m512 m = _mm512_set1_ps(best);
      for (; i + 16 <= V && nan_at < 0; i += 16) {
        const __m512 v = _mm512_loadu_ps(row + i);
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        if (nan) nan_at = i + __builtin_ctz(nan);
        m = _mm512_max_ps(m, v);
      }
      if (nan_at < 0) best = _mm512_reduce_max_ps(m);
#endif
      for (; i < V && nan_at < 0; ++i) {
        if (std::isnan(row[i])) nan_at = i;
        else if (row[i] > best) best = row[i];
      }
      if (nan_at >= 0) {  // NaN is the maximum, as torch.max has it
        op[b] = nan_at;
        continue;
      }
      int64_t j = 0;  // the first index holding the maximum
#ifdef CPU_CAPABILITY_AVX512
      const __m512 target = _mm512_set1_ps(best);
      for (; j + 16 <= V; j += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), target, _CMP_EQ_OQ);
        if (hit) break;
      }
#endif
      while (row[j] != best) ++j;
      op[b] = j;
    }
  });
  return out;
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be [T, 2 * I] with contiguous rows");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    silu_mul_impl<scalar_t>(gate_up, out);
  });
  return out;
}
