// Grouped (segmented) bf16 linear for decode: out[rows_g] = x[rows_g] @ W_g^T (+ b_g)
// for every group g of a co-batched family in one call, so the linear layers of
// several fine-tunes cost one parallel region instead of one matmul call per model
// (as Punica's SGMV does for LoRA deltas, here for full weights).
//
// Decode rows are few per model, so the op streams each weight once from memory:
// a task owns kBlockN output features of one group; each tile of kTileN outputs
// walks that group's rows in tiles of kTileM, accumulated with AVX512-BF16 dot
// products (fp32 accumulators, one horizontal sum per output), and a group of at
// most kSeqRows rows reads the weight rows one after another instead. Each output's sum
// runs in a fixed order over K, so a row's result does not depend on which other
// rows or groups share the call: a co-batched row equals the same row run alone.
//
// On CPUs with AMX (Sapphire Rapids and later) the op runs on the tile unit
// instead: the weight block is the A operand as it lies in memory (16 output
// features x 32 K values), the group's rows are packed once per call into the
// B operand's pair-interleaved layout (32 K values x 16 rows), and each output
// accumulates over K in the same fixed order of tile products whatever the other
// columns hold, so rows stay independent of their batch there too. AVX512-BF16
// dot products do 32 multiply-adds per instruction, a tile product 8,192: at 16
// rows the dot-product path was compute-bound at 2.5x the time of oneDNN's AMX
// matmul, while on tiles the op streams the weights at memory speed.
#include "ops.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "simd.h"
#include "amx.h"
#include "team.h"
#include "transpose.h"

namespace {

constexpr int64_t kTileM = 4;    // input rows per register tile
constexpr int64_t kTileN = 4;    // output features per register tile
constexpr int64_t kBlockN = 64;  // output features per task

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch converts float to bfloat16; NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#ifdef DS_HAVE_AVX512BF16
// out[m][j] = dot(x_m, w_j) over K for MM rows and NN outputs (rows of w, stride ldw).
template <int MM, int NN>
inline void tile(const uint16_t* const* xs, const uint16_t* w, int64_t ldw, int64_t K,
                 float out[kTileM][kTileN]) {
  __m512 acc[MM][NN];
  for (int m = 0; m < MM; ++m)
    for (int j = 0; j < NN; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NN];
    for (int j = 0; j < NN; ++j) wv[j] = _mm512_loadu_si512(w + j * ldw + k);
    // the next tile's weight rows, one tile ahead: the loop interleaves compute
    // with four weight streams, and the hardware prefetcher alone leaves the
    // memory bus idle
    for (int j = 0; j < NN; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + (NN + j) * ldw + k), _MM_HINT_T0);
    for (int m = 0; m < MM; ++m) {
      const __m512i xv = _mm512_loadu_si512(xs[m] + k);
      for (int j = 0; j < NN; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512i wv[NN];
    for (int j = 0; j < NN; ++j) wv[j] = _mm512_maskz_loadu_epi16(mask, w + j * ldw + k);
    for (int m = 0; m < MM; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, xs[m] + k);
      for (int j = 0; j < NN; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  if constexpr (NN == 4) {
    // four horizontal sums at once (a fixed tree, so still order-deterministic)
    for (int m = 0; m < MM; ++m) _mm_storeu_ps(out[m], hsum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
  } else {
    for (int m = 0; m < MM; ++m)
      for (int j = 0; j < NN; ++j) out[m][j] = _mm512_reduce_add_ps(acc[m][j]);
  }
}

inline void dot_tile(const uint16_t* const* xs, int64_t M, const uint16_t* w, int64_t ldw, int64_t K,
                     int64_t nn, float out[kTileM][kTileN]) {
  if (nn == kTileN) {
    switch (M) {
      case 4: return tile<4, kTileN>(xs, w, ldw, K, out);
      case 3: return tile<3, kTileN>(xs, w, ldw, K, out);
      case 2: return tile<2, kTileN>(xs, w, ldw, K, out);
      default: return tile<1, kTileN>(xs, w, ldw, K, out);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < nn; ++j) {
      float one[kTileM][kTileN];
      tile<1, 1>(xs + m, w + j * ldw, ldw, K, one);
      out[m][j] = one[0][0];
    }
  }
}

// Row-sequential path for groups of at most kSeqRows rows (decode of one to a few
// requests per model), where the op is bound by the weight stream: each of 16
// weight rows is read start to end in turn (tile() reads four rows side by side,
// which streams memory at about half the rate: docs/kernels.md), with one fp32
// accumulator per row
// and output in the same K order as tile(), and the 16 outputs' lanes reduced
// together (transposed) with tile()'s horizontal-sum tree, so each output is
// bit-identical to the tiled path's and a row's result still does not depend on
// how many rows share the call. From four rows on it is no faster, so those stay
// tiled.
constexpr int64_t kSeqRows = 3;
constexpr int64_t kSeqBlock = 16;

template <int MM>
inline void seq_block(const uint16_t* const* xs, const uint16_t* w, int64_t K,
                      float (*sums)[kSeqBlock][16]) {
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K % 32)) - 1);
  for (int64_t i = 0; i < kSeqBlock; ++i) {
    const uint16_t* wr = w + i * K;
    __m512 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512i wv = _mm512_loadu_si512(wr + k);
      for (int m = 0; m < MM; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(xs[m] + k), (__m512bh)wv);
    }
    if (k < K) {
      const __m512i wv = _mm512_maskz_loadu_epi16(tail, wr + k);
      for (int m = 0; m < MM; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_maskz_loadu_epi16(tail, xs[m] + k), (__m512bh)wv);
    }
    for (int m = 0; m < MM; ++m) _mm512_store_ps(sums[m][i], acc[m]);
  }
}

// out[i] = hsum4's horizontal sum (tile()'s) of row i of `lanes`: h_j = a_j + a_{j+8},
// ((h0 + h1) + (h2 + h3)) + ((h4 + h5) + (h6 + h7)), for 16 rows at once.
inline __m512 tree_sum16(const float (*lanes)[16]) {
  __m512 t[16];
  transpose16(lanes, t);
  __m512 h[8];
  for (int j = 0; j < 8; ++j) h[j] = _mm512_add_ps(t[j], t[j + 8]);
  return _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(h[0], h[1]), _mm512_add_ps(h[2], h[3])),
                       _mm512_add_ps(_mm512_add_ps(h[4], h[5]), _mm512_add_ps(h[6], h[7])));
}

// Outputs [n, n + kSeqBlock) of MM <= kSeqRows rows, stored as bf16.
template <int MM>
inline void seq_outputs(const uint16_t* const* xs, const uint16_t* w, const uint16_t* bias, int64_t K,
                        int64_t n, int64_t N, const int64_t* r, uint16_t* op) {
  alignas(64) float sums[MM][kSeqBlock][16];
  seq_block<MM>(xs, w, K, sums);
  for (int m = 0; m < MM; ++m) {
    alignas(64) float res[16];
    _mm512_store_ps(res, tree_sum16(sums[m]));
    uint16_t* dst = op + r[m] * N + n;
    for (int64_t j = 0; j < kSeqBlock; ++j)
      dst[j] = float_to_bf16(bias ? res[j] + bf16_to_float(bias[n + j]) : res[j]);
  }
}

inline void seq_outputs(const uint16_t* const* xs, int64_t M, const uint16_t* w, const uint16_t* bias,
                        int64_t K, int64_t n, int64_t N, const int64_t* r, uint16_t* op) {
  static_assert(kSeqRows == 3, "one case per row count");
  switch (M) {
    case 3: return seq_outputs<3>(xs, w, bias, K, n, N, r, op);
    case 2: return seq_outputs<2>(xs, w, bias, K, n, N, r, op);
    default: return seq_outputs<1>(xs, w, bias, K, n, N, r, op);
  }
}
#else
// Portable fallback (no AVX512-BF16 at build time): the same fixed-order sums.
inline void dot_tile(const uint16_t* const* xs, int64_t M, const uint16_t* w, int64_t ldw, int64_t K,
                     int64_t nn, float out[kTileM][kTileN]) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < nn; ++j) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += bf16_to_float(xs[m][k]) * bf16_to_float(w[j * ldw + k]);
      out[m][j] = acc;
    }
  }
}
#endif

#ifdef DS_HAVE_AMX
constexpr int64_t kAmxK = amx_linear::kK;
constexpr int64_t kAmxRows = amx_linear::kRows;
constexpr int64_t kAmxCols = amx_linear::kCols;
constexpr int64_t kAmxPrefetch = 4;  // K blocks ahead that the weight rows are prefetched

// Accumulator tile (s, b) -> output sub-block s of 16 features, row block b.
// Stored C tiles hold [feature][row]; each row's 16 features are gathered
// across the tile, biased, rounded to bf16 (nearest even) and stored at once.
inline void store_block(const float (*acc)[kAmxRows][kAmxCols], int nsub, int64_t M, const int64_t* r,
                        const float* bias16, int64_t n0, int64_t N, uint16_t* op) {
  static_assert(kAmxRows == 16 && kAmxCols == 16, "tile_column reads 16 x 16 tiles");
  for (int s = 0; s < nsub; ++s) {
    const __m512 b = bias16 ? _mm512_loadu_ps(bias16 + s * kAmxRows) : _mm512_setzero_ps();
    __m512 cols[16];
    if (M > 4) {  // a fuller block: one in-register transpose instead of a gather per row
      transpose16(acc[s], cols);
    } else {
      for (int64_t m = 0; m < M; ++m) cols[m] = tile_column(acc[s], static_cast<int>(m));
    }
    for (int64_t m = 0; m < M; ++m)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + r[m] * N + n0 + s * kAmxRows),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(cols[m], b)));
  }
}

// Outputs [n0, n0 + 16 * nsub) of one group for all its rows, two row blocks at
// a time: tiles 0-3 accumulate (sub-block s, row block b at 2 * b + s), 4-5 hold
// the row blocks' B operands, 6-7 the weight blocks (each read once for both).
void amx_task(const uint32_t* packed, int64_t rn, const uint16_t* w, const uint16_t* bias, int64_t K,
              int64_t N, int64_t n0, int nsub, const int64_t* r, uint16_t* op) {
  const int64_t kbc = K / kAmxK, block = kbc * kAmxRows * kAmxCols;
  alignas(64) float acc[4][kAmxRows][kAmxCols];
  alignas(64) float bias32[2 * kAmxRows];
  if (bias)
    for (int64_t n = 0; n < nsub * kAmxRows; ++n) bias32[n] = bf16_to_float(bias[n0 + n]);
  const uint16_t* w0 = w + n0 * K;
  const uint16_t* w1 = w + (n0 + kAmxRows) * K;
  for (int64_t m0 = 0; m0 < rn; m0 += 2 * kAmxCols) {
    const uint32_t* b0 = packed + (m0 / kAmxCols) * block;
    const bool two = m0 + kAmxCols < rn;
    // prefetch while the weights come from memory (the first row blocks) and,
    // in the last, the next task's first blocks; the row blocks in between
    // find the weights in cache, and prefetching there too slows them
    const bool first = m0 == 0, last = m0 + 2 * kAmxCols >= rn;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < kbc; ++kb) {
      const int64_t bo = kb * kAmxRows * kAmxCols, wo = kb * kAmxK;
      // a tile load touches one cache line in each of 16 weight rows; the
      // hardware prefetcher does not follow that pattern and at few rows the
      // loop waits on memory; near the rows' end it fetches the first blocks of
      // the next task's rows (the next 32 features, where a thread's next task
      // usually lies), which otherwise start on a miss each
      const int64_t ahead = kb + kAmxPrefetch;
      if (ahead < kbc ? first : last) {
        const uint16_t* pw = ahead < kbc ? w0 + ahead * kAmxK : w0 + amx_linear::kTaskN * K + (ahead - kbc) * kAmxK;
        for (int64_t i = 0; i < nsub * kAmxRows; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(pw + i * K), _MM_HINT_T0);
      }
      _tile_loadd(4, b0 + bo, kAmxCols * 4);
      _tile_loadd(6, w0 + wo, K * 2);
      _tile_dpbf16ps(0, 6, 4);
      if (nsub == 2) {
        _tile_loadd(7, w1 + wo, K * 2);
        _tile_dpbf16ps(1, 7, 4);
      }
      if (two) {
        _tile_loadd(5, b0 + block + bo, kAmxCols * 4);
        _tile_dpbf16ps(2, 6, 5);
        if (nsub == 2) _tile_dpbf16ps(3, 7, 5);
      }
    }
    _tile_stored(0, acc[0], kAmxCols * 4);
    _tile_stored(1, acc[1], kAmxCols * 4);
    store_block(acc, nsub, std::min(kAmxCols, rn - m0), r + m0, bias ? bias32 : nullptr, n0, N, op);
    if (two) {
      _tile_stored(2, acc[2], kAmxCols * 4);
      _tile_stored(3, acc[3], kAmxCols * 4);
      store_block(acc + 2, nsub, std::min(kAmxCols, rn - m0 - kAmxCols), r + m0 + kAmxCols,
                  bias ? bias32 : nullptr, n0, N, op);
    }
  }
}
#endif

// Outputs [n0, n1) of one group's rn rows (r: their rows in x and the [T, N]
// output). Groups of a few rows stream the weights row by row (seq_outputs); the
// rest run weight tiles outside and row blocks inside, so a tile's kTileN weight
// rows come from memory once and stay in L1 for every row block (the other order
// is slower: docs/kernels.md). Each output is the same whatever
// [n0, n1) it is computed in.
void block_outputs(const uint16_t* xp, int64_t ldx, const int64_t* r, int64_t rn, const uint16_t* w,
                   const uint16_t* bias, int64_t K, int64_t N, int64_t n0, int64_t n1, uint16_t* op) {
  int64_t n = n0;
#ifdef DS_HAVE_AVX512BF16
  if (rn <= kSeqRows) {
    const uint16_t* xs[kSeqRows];
    for (int64_t m = 0; m < rn; ++m) xs[m] = xp + r[m] * ldx;
    for (; n + kSeqBlock <= n1; n += kSeqBlock) seq_outputs(xs, rn, w + n * K, bias, K, n, N, r, op);
  }
#endif
  for (; n < n1; n += kTileN) {
    const int64_t nn = std::min(kTileN, n1 - n);
    for (int64_t m0 = 0; m0 < rn; m0 += kTileM) {
      const int64_t M = std::min(kTileM, rn - m0);
      const uint16_t* xs[kTileM];
      for (int64_t m = 0; m < kTileM; ++m) xs[m] = xp + r[m0 + std::min(m, M - 1)] * ldx;
      float res[kTileM][kTileN];
      dot_tile(xs, M, w + n * K, K, K, nn, res);
      for (int64_t m = 0; m < M; ++m) {
        uint16_t* dst = op + r[m0 + m] * N + n;
        for (int64_t j = 0; j < nn; ++j)
          dst[j] = float_to_bf16(bias ? res[m][j] + bf16_to_float(bias[n + j]) : res[m][j]);
      }
    }
  }
}

}  // namespace

bool grouped_linear_uses_amx(int64_t K, int64_t N) {
#ifdef DS_HAVE_AMX
  return amx_linear::supported(K, N);
#else
  (void)K;
  (void)N;
  return false;
#endif
}

namespace vec_linear {

void task(const uint16_t* x, int64_t ldx, const int64_t* r, int64_t rn, const uint16_t* w, const uint16_t* bias,
          int64_t K, int64_t N, int64_t t, uint16_t* op) {
  const int64_t n0 = t * kTaskN;
  block_outputs(x, ldx, r, rn, w, bias, K, N, n0, std::min(N, n0 + kTaskN), op);
}

}  // namespace vec_linear

#ifdef DS_HAVE_AMX
namespace amx_linear {

void pack_rows(const uint16_t* x, int64_t ldx, const int64_t* r, int64_t rn, int64_t K, int64_t kb0, int64_t kb1,
               uint32_t* packed) {
  static_assert(kRows == 16 && kCols == 16 && kK == 32, "a tile is one 16 x 16 word transpose");
  const int64_t kbc = K / kK;
  for (int64_t m0 = 0; m0 < rn; m0 += kCols) {
    const int64_t mm = std::min(kCols, rn - m0);
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      __m512i t[16];  // row m's K block as 16 words, transposed: t[p] = pair p of every row
      for (int64_t m = 0; m < 16; ++m)
        t[m] = m < mm ? _mm512_loadu_si512(x + r[m0 + m] * ldx + kb * kK) : _mm512_setzero_si512();
      transpose16x16_epi32(t);
      uint32_t* dst = packed + ((m0 / kCols) * kbc + kb) * kRows * kCols;
      for (int p = 0; p < 16; ++p) _mm512_store_si512(dst + p * kCols, t[p]);
    }
  }
}

void load_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.set(t, kRows, 64);
  cfg.load();
}

void task(const uint32_t* packed, int64_t rn, const uint16_t* w, const uint16_t* bias, int64_t K, int64_t N,
          int64_t t, const int64_t* r, uint16_t* op) {
  const int64_t n0 = t * kTaskN;
  const int nsub = static_cast<int>(std::min<int64_t>(2, (N - n0) / kRows));
  amx_task(packed, rn, w, bias, K, N, n0, nsub, r, op);
}

}  // namespace amx_linear
#endif

at::Tensor grouped_linear(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                          const std::vector<c10::optional<at::Tensor>>& biases,
                          const std::vector<at::Tensor>& rows) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, K] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "grouped_linear is a bfloat16 kernel");
  TORCH_CHECK(!weights.empty() && weights.size() == rows.size() && biases.size() == weights.size(),
              "one weight, one bias (or None) and one row index per group");
  const int64_t T = x.size(0), K = x.size(1), N = weights[0].size(0);
  const int64_t G = static_cast<int64_t>(weights.size());
  std::vector<const uint16_t*> wp(G), bp(G, nullptr);
  std::vector<at::Tensor> row_idx(G);
  std::vector<int64_t> task_start(G + 1, 0);
  const int64_t blocks = (N + kBlockN - 1) / kBlockN;
  for (int64_t g = 0; g < G; ++g) {
    const auto& w = weights[g];
    TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) == K && w.is_contiguous() &&
                    w.scalar_type() == at::kBFloat16,
                "every weight must be a contiguous bfloat16 [N, K] with the same N and K");
    wp[g] = reinterpret_cast<const uint16_t*>(w.data_ptr());
    if (biases[g].has_value()) {
      const auto& b = *biases[g];
      TORCH_CHECK(b.numel() == N && b.is_contiguous() && b.scalar_type() == at::kBFloat16,
                  "a bias must be a contiguous bfloat16 [N]");
      bp[g] = reinterpret_cast<const uint16_t*>(b.data_ptr());
    }
    row_idx[g] = rows[g].to(at::kLong).contiguous();
    const int64_t* r = row_idx[g].data_ptr<int64_t>();
    for (int64_t i = 0; i < row_idx[g].numel(); ++i)
      TORCH_CHECK(r[i] >= 0 && r[i] < T, "row index ", r[i], " out of range for ", T, " rows");
    task_start[g + 1] = task_start[g] + (row_idx[g].numel() ? blocks : 0);
  }
  auto out = at::empty({T, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t ldx = x.stride(0);

#ifdef DS_HAVE_AMX
  if (grouped_linear_uses_amx(K, N)) {
    const int64_t amx_blocks = amx_linear::tasks(N), kbc = K / amx_linear::kK;
    std::vector<TileVector<uint32_t>> packed(G);
    std::vector<int64_t> amx_start(G + 1, 0);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t rn = row_idx[g].numel();
      packed[g].resize(amx_linear::packed_words(rn, K));
      amx_start[g + 1] = amx_start[g] + (rn ? amx_blocks : 0);
    }
    // one team: each thread packs its share of the K blocks of every group's
    // rows (at 224 rows the packing was a tenth of the time, on one thread
    // while the other waited), then runs its share of the tasks
    const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(threads)
    {
      const int64_t tid = omp_get_thread_num(), n = omp_get_num_threads();
      for (int64_t g = 0; g < G; ++g)
        amx_linear::pack_rows(xp, ldx, row_idx[g].data_ptr<int64_t>(), row_idx[g].numel(), K, kbc * tid / n,
                              kbc * (tid + 1) / n, packed[g].data());
#pragma omp barrier
      amx_linear::load_config();
      for (int64_t t = amx_start[G] * tid / n; t < amx_start[G] * (tid + 1) / n; ++t) {
        const int64_t g = std::upper_bound(amx_start.begin(), amx_start.end(), t) - amx_start.begin() - 1;
        amx_linear::task(packed[g].data(), row_idx[g].numel(), wp[g], bp[g], K, N, t - amx_start[g],
                         row_idx[g].data_ptr<int64_t>(), op);
      }
      _tile_release();
    }
    return out;
  }
#endif

  at::parallel_for(0, task_start[G], 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = std::upper_bound(task_start.begin(), task_start.end(), t) - task_start.begin() - 1;
      const int64_t n0 = (t - task_start[g]) * kBlockN;
      block_outputs(xp, ldx, row_idx[g].data_ptr<int64_t>(), row_idx[g].numel(), wp[g], bp[g], K, N, n0,
                    std::min(N, n0 + kBlockN), op);
    }
  });
  return out;
}

bool amx_available() { return grouped_linear_uses_amx(32, 16); }
