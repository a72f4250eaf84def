// The codec profile's per-layer transforms (cachegen/transform.py) on the calling
// thread: the KV store's codec runs on background threads, where numpy's BLAS
// would start a thread pool of its own beside the engine's forward passes.
#include "ops.h"

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kRows = 6;   // tokens per register tile: 6 x 4 accumulators + 4 loads fit 32 zmm
constexpr int64_t kCols = 64;  // output channels per register tile (4 AVX-512 vectors)

// out[t, :] = (in[t, :] - centre) @ m (subtract) or in[t, :] @ m + centre, for
// T rows of C values at row strides in_stride / out_stride; m is C x C row-major.
void apply(const float* in, int64_t in_stride, float* out, int64_t out_stride, int64_t T, int64_t C,
           const float* m, const float* centre, bool subtract) {
  std::vector<float> rows(kRows * C);
  for (int64_t t0 = 0; t0 < T; t0 += kRows) {
    const int64_t nt = std::min(kRows, T - t0);
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const float v = r < nt ? in[(t0 + r) * in_stride + c] : 0.f;
        rows[r * C + c] = subtract ? v - centre[c] : v;
      }
    int64_t j0 = 0;
    for (; j0 + kCols <= C; j0 += kCols) {
      float acc[kRows][kCols] = {};
      for (int64_t c = 0; c < C; ++c) {
        const float* mc = m + c * C + j0;
        for (int64_t r = 0; r < kRows; ++r) {
          const float x = rows[r * C + c];
          for (int64_t j = 0; j < kCols; ++j) acc[r][j] += x * mc[j];
        }
      }
      for (int64_t r = 0; r < nt; ++r)
        for (int64_t j = 0; j < kCols; ++j)
          out[(t0 + r) * out_stride + j0 + j] = acc[r][j] + (subtract ? 0.f : centre[j0 + j]);
    }
    for (int64_t j = j0; j < C; ++j)  // channels past the last whole tile
      for (int64_t r = 0; r < nt; ++r) {
        float s = 0.f;
        for (int64_t c = 0; c < C; ++c) s += rows[r * C + c] * m[c * C + j];
        out[(t0 + r) * out_stride + j] = s + (subtract ? 0.f : centre[j]);
      }
  }
}

}  // namespace

at::Tensor codec_transform(const at::Tensor& x, const at::Tensor& mats, const at::Tensor& centre, int64_t first,
                           bool forward) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous CPU float32 [L, T, 2C] tensor");
  TORCH_CHECK(mats.dim() == 4 && mats.size(1) == 2 && mats.size(2) == mats.size(3) &&
                  mats.scalar_type() == at::kFloat && mats.is_contiguous(),
              "mats must be contiguous float32 [layers, 2, C, C]");
  TORCH_CHECK(centre.dim() == 3 && centre.size(0) == mats.size(0) && centre.size(1) == 2 &&
                  centre.size(2) == mats.size(2) && centre.scalar_type() == at::kFloat && centre.is_contiguous(),
              "centre must be contiguous float32 [layers, 2, C]");
  const int64_t L = x.size(0), T = x.size(1), C = mats.size(2);
  TORCH_CHECK(x.size(2) == 2 * C && first >= 0 && first + L <= mats.size(0), "x does not fit the transforms");
  at::Tensor out = at::empty_like(x);
  pybind11::gil_scoped_release no_gil;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t l = 0; l < L; ++l)
    for (int64_t h = 0; h < 2; ++h)
      apply(xp + l * T * 2 * C + h * C, 2 * C, op + l * T * 2 * C + h * C, 2 * C, T, C,
            mats.data_ptr<float>() + ((first + l) * 2 + h) * C * C,
            centre.data_ptr<float>() + ((first + l) * 2 + h) * C, forward);
  return out;
}
