// Fused RoPE + KV store: one pass over q, k, v instead of ~10 torch ops.
#include "ops.h"

#include <ATen/Parallel.h>

#include "rowops.h"

namespace {

template <typename scalar_t>
void rope_store_impl(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                     const at::Tensor& cos_sin, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& out_loc) {
  const int64_t T = q.size(0), hq = q.size(1), hkv = k.size(1), D = q.size(2);
  scalar_t* qp = q.data_ptr<scalar_t>();
  scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* kc = k_cache.data_ptr<scalar_t>();
  scalar_t* vc = v_cache.data_ptr<scalar_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* loc = out_loc.data_ptr<int64_t>();
  const float* cs = cos_sin.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1);
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      rope_store_token(qp + t * qs0, qs1, hq, kp + t * ks0, ks1, vp + t * vs0, vs1, hkv, D, cs, pos[t],
                       kc + loc[t] * hkv * D, vc + loc[t] * hkv * D);
  });
}

}  // namespace

void rope_and_store(at::Tensor q, at::Tensor k, const at::Tensor& v, const at::Tensor& positions,
                    const at::Tensor& cos_sin_cache, at::Tensor k_cache, at::Tensor v_cache,
                    const at::Tensor& out_loc) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [T, H, D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "head dim must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "pool must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == k_cache.scalar_type(),
              "q, k and the pool must share a dtype");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.is_contiguous(),
              "cos_sin_cache must be contiguous float32");
  TORCH_CHECK(positions.scalar_type() == at::kLong && out_loc.scalar_type() == at::kLong,
              "positions and out_loc must be int64");
  TORCH_CHECK(q.size(2) % 2 == 0 && cos_sin_cache.size(1) == q.size(2), "bad head dim");
  auto pos = positions.contiguous();
  auto loc = out_loc.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_and_store", [&] {
    rope_store_impl<scalar_t>(q, k, v, pos, cos_sin_cache, k_cache, v_cache, loc);
  });
}
