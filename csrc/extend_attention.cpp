// Extend (prefill) attention over the slot pool, fused with RoPE and the KV store:
// one call per layer for a ragged batch. Request b's queries sit at positions
// prefix_lens[b] .. prefix_lens[b] + extend_lens[b] - 1 and see every key of its
// sequence up to their own position, read from the pool through req_to_token.
// The cross-model recompute of a layer span over a stored prefix runs through it
// (its prefix is the part of the span already recomputed plus the receiver's own).
#include "ops.h"
#include "vec.h"  // before any ATen header that pulls in Vectorized<>
#include "amx.h"
#include "team.h"
#include "transpose.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

// Causal bf16 attention of one request, blocked over queries: per (KV head, block
// of BQ queries) the block's G query heads are stacked into one [G * BQ, D] matrix,
// scores against every key the block sees come from one brgemm with fp32 output
// (as exact as SDPA's flash kernel, which also keeps scores in fp32), one pass per
// row applies scale, the causal limit and softmax and writes bf16 probabilities,
// and oneDNN's bf16 matmul multiplies them by V (faster than SDPA's CPU flash
// kernel: docs/kernels.md). With AMX, both products run as brgemm on tiles over
// packed K^T and V, and the probabilities are left unnormalised (each output row
// is divided by its sum after P @ V).
constexpr int64_t BQ = 64;
// kAmxSmallExtend (team.h): tokens per request up to which an extend runs on
// attend_amx, which skips packing the prefix; past that the packed path's reuse of
// K^T across query blocks wins.
constexpr int64_t kKB = 64;  // keys per packed block (oneDNN's VNNI B takes ld_b <= 64)

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



#ifdef DS_HAVE_AVX512BF16
// c[r][0..64) = sum over pairs kp < K2 of row r's pair kp of a (two bf16, one
// 32-bit word; rows lda_w words apart) times row kp of b (64 pairs, ldb_w words
// apart), for R rows, in fp32: a bf16 GEMM against a VNNI-packed B, as brgemm
// does on tiles, here with AVX512-BF16 dot products (each lane of one
// instruction adds a pair's two products to one output column, so no
// horizontal sums). It serves both products of the blocked path on CPUs without
// AMX: Q @ K^T (b: one packed K^T block, 64 keys) and P @ V (b: 64 head dims of
// the packed V). Without AMX, oneDNN/MKL's bf16 brgemm runs an fp32 path, hence
// our own kernel there.
template <int R>
inline void vnni_rows64(const uint32_t* a, int64_t lda_w, const uint32_t* b, int64_t ldb_w, int64_t K2, float* c,
                        int64_t ldc) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    const uint32_t* br = b + kp * ldb_w;
    __m512i bv[4];
    for (int j = 0; j < 4; ++j) bv[j] = _mm512_loadu_si512(br + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(a[r * lda_w + kp]));
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)av, (__m512bh)bv[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
}

constexpr int64_t kVnniRows = 6;  // 24 accumulators, 4 B vectors and a broadcast in 32 registers

// vnni_rows64 over M rows; K2_of(r0, rows) gives the pairs a tile of rows needs
// (P @ V stops at the tile's last visible key: P is zero past it).
template <typename PairsOf>
inline void vnni_gemm64(int64_t M, const at::BFloat16* a, int64_t lda, const at::BFloat16* b, int64_t ldb_w,
                        PairsOf pairs_of, float* c, int64_t ldc) {
  const auto* aw = reinterpret_cast<const uint32_t*>(a);
  const auto* bw = reinterpret_cast<const uint32_t*>(b);
  const int64_t lda_w = lda / 2;
  for (int64_t r0 = 0; r0 < M; r0 += kVnniRows) {
    const int64_t rows = std::min(kVnniRows, M - r0), K2 = pairs_of(r0, rows);
    const uint32_t* ar = aw + r0 * lda_w;
    float* cr = c + r0 * ldc;
    switch (rows) {
      case 6: vnni_rows64<6>(ar, lda_w, bw, ldb_w, K2, cr, ldc); break;
      case 5: vnni_rows64<5>(ar, lda_w, bw, ldb_w, K2, cr, ldc); break;
      case 4: vnni_rows64<4>(ar, lda_w, bw, ldb_w, K2, cr, ldc); break;
      case 3: vnni_rows64<3>(ar, lda_w, bw, ldb_w, K2, cr, ldc); break;
      case 2: vnni_rows64<2>(ar, lda_w, bw, ldb_w, K2, cr, ldc); break;
      default: vnni_rows64<1>(ar, lda_w, bw, ldb_w, K2, cr, ldc); break;
    }
  }
}
#endif

// Packs head h's keys kb*kKB .. +kKB (zero past L) as one VNNI block of K^T
// ([D/2][kKB] pairs of head dims: a key's (d, d+1) pair is one 32-bit word of its
// row, so this is a word transpose) and its values as VNNI rows of V ([kKB/2][D]
// pairs of consecutive keys), the layouts cpublas::pack produces for brgemm.
void pack_block_vnni(const KVRows& kv, int64_t h, int64_t kb, int64_t L, int64_t D, at::BFloat16* kt_block,
                     at::BFloat16* v_block) {
  const int64_t words = D / 2, j0 = kb * kKB;
  auto* kout = reinterpret_cast<uint32_t*>(kt_block);
  auto* vout = reinterpret_cast<uint16_t*>(v_block);
#ifdef CPU_CAPABILITY_AVX512
  if (D % 32 == 0) {
    for (int64_t k0 = 0; k0 < kKB; k0 += 16)
      for (int64_t w0 = 0; w0 < words; w0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = j0 + k0 + i < L ? _mm512_loadu_si512(kv.key(j0 + k0 + i, h) + 2 * w0) : _mm512_setzero_si512();
        transpose16x16_epi32(r);
        for (int w = 0; w < 16; ++w) _mm512_storeu_si512(kout + (w0 + w) * kKB + k0, r[w]);
      }
    alignas(64) int16_t lo_idx[32], hi_idx[32];
    for (int i = 0; i < 16; ++i) {
      lo_idx[2 * i] = i, lo_idx[2 * i + 1] = 32 + i;
      hi_idx[2 * i] = 16 + i, hi_idx[2 * i + 1] = 48 + i;
    }
    const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
    for (int64_t pr = 0; pr < kKB / 2; ++pr) {
      const int64_t ja = j0 + 2 * pr, jb = ja + 1;
      uint16_t* o = vout + pr * D * 2;
      for (int64_t d0 = 0; d0 < D; d0 += 32) {
        const __m512i a = ja < L ? _mm512_loadu_si512(kv.value(ja, h) + d0) : _mm512_setzero_si512();
        const __m512i b = jb < L ? _mm512_loadu_si512(kv.value(jb, h) + d0) : _mm512_setzero_si512();
        _mm512_storeu_si512(o + 2 * d0, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512(o + 2 * d0 + 32, _mm512_permutex2var_epi16(a, hi, b));
      }
    }
    return;
  }
#endif
  for (int64_t n = 0; n < kKB; ++n) {
    const int64_t j = j0 + n;
    if (j < L) {
      uint32_t row[kKB / 2];
      std::memcpy(row, kv.key(j, h), D * sizeof(at::BFloat16));
      for (int64_t w = 0; w < words; ++w) kout[w * kKB + n] = row[w];
    } else {
      for (int64_t w = 0; w < words; ++w) kout[w * kKB + n] = 0;
    }
  }
  for (int64_t pr = 0; pr < kKB / 2; ++pr) {
    const int64_t ja = j0 + 2 * pr, jb = ja + 1;
    uint16_t a[kKB] = {}, b[kKB] = {};
    if (ja < L) std::memcpy(a, kv.value(ja, h), D * sizeof(at::BFloat16));
    if (jb < L) std::memcpy(b, kv.value(jb, h), D * sizeof(at::BFloat16));
    uint16_t* o = vout + pr * D * 2;
    for (int64_t d = 0; d < D; ++d) {
      o[2 * d] = a[d];
      o[2 * d + 1] = b[d];
    }
  }
}

}  // namespace

// Where oneDNN's brgemm runs on AMX it wants B pair-interleaved (VNNI): K^T is
// packed per block of kKB keys (its ld_b is at most 64) and V whole, both padded
// with zero keys to whole blocks, straight from where the rows lie (in parallel
// over heads and blocks), and both products run as brgemm. Elsewhere K^T and V
// are gathered plain and P @ V goes through oneDNN's matmul (about twice
// brgemm's rate without AMX), except on CPUs with AVX512-BF16, where the same
// packed blocks go through vnni_gemm64 (D a multiple of 64).
BlockedAttention::BlockedAttention(int64_t hq, int64_t hk, int64_t D, int64_t p, int64_t n, float scale,
                                   int64_t threads, const at::TensorOptions& opts)
    : hk_(hk), D_(D), p_(p), n_(n), L_(p + n), G_(hq / hk), scale_(scale) {
  tiles_ = at::native::cpublas::could_pack(at::kBFloat16) && amx_available() && D % 2 == 0 && D <= kKB;
#if defined(DS_HAVE_AVX512BF16) && defined(CPU_CAPABILITY_AVX512)
  dots_ = !tiles_ && D % 64 == 0;
#endif
  nb_ = (n + BQ - 1) / BQ;
  nkb_ = (L_ + kKB - 1) / kKB;
  const int64_t Le = nkb_ * kKB;
  const bool vnni = tiles_ || dots_;
  kt_.resize(hk);
  vh_.resize(hk);
  for (int64_t h = 0; h < hk; ++h) {
    kt_[h] = at::empty({vnni ? Le * D : D * L_}, opts);
    vh_[h] = at::empty({vnni ? Le * D : L_ * D}, opts);
  }
  // A short extend (one block per head, e.g. a prompt over a cached prefix)
  // splits each head's query-head group into one task per query head, or two
  // threads would share 3 tasks.
  parts_ = hk * nb_ < 2 * threads ? G_ : 1;
}

bool BlockedAttention::fits(int64_t p, int64_t n) { return n > 0 && p + n >= BQ; }

int64_t BlockedAttention::pack_units() const { return tiles_ || dots_ ? hk_ * nkb_ : hk_; }

void BlockedAttention::pack(const KVRows& kv, int64_t begin, int64_t end) {
  const int64_t D = D_, L = L_;
  for (int64_t t = begin; t < end; ++t) {
    if (tiles_ || dots_) {
      const int64_t h = t / nkb_, c = t % nkb_;
      pack_block_vnni(kv, h, c, L, D, kt_[h].data_ptr<at::BFloat16>() + c * D * kKB,
                      vh_[h].data_ptr<at::BFloat16>() + c * kKB * D);
      continue;
    }
    const int64_t h = t;
    at::BFloat16* ktp = kt_[h].data_ptr<at::BFloat16>();  // [D, L]
    at::BFloat16* vp = vh_[h].data_ptr<at::BFloat16>();   // [L, D]
    for (int64_t j = 0; j < L; ++j) {
      const at::BFloat16* kr = kv.key(j, h);
      for (int64_t d = 0; d < D; ++d) ktp[d * L + j] = kr[d];
      std::copy_n(kv.value(j, h), D, vp + j * D);
    }
  }
}

// Task t: query heads part t % parts of KV head (t / parts) % hk, query block
// zigzag(t / parts / hk) (0, nb-1, 1, nb-2, ...), so that contiguous halves of
// the tasks carry similar causal work.
void BlockedAttention::run(const at::BFloat16* qp, int64_t qs0, int64_t qs1, at::BFloat16* op, int64_t os0,
                           int64_t os1, int64_t begin, int64_t end) const {
  if (begin >= end) return;
  const int64_t n = n_, p = p_, D = D_, L = L_, hk = hk_, G = G_, nb = nb_, parts = parts_, gper = G / parts;
  const int64_t Le = nkb_ * kKB;
  const bool tiles = tiles_, vnni = tiles_ || dots_;
  const float scale = scale_;
  const auto& kt = kt_;
  const auto& vh = vh_;
  // sized for the largest task's rows (gper * min(BQ, n)); uninitialised
  const int64_t rows_max = gper * std::min(BQ, n);
  std::unique_ptr<at::BFloat16[]> qbuf(new at::BFloat16[rows_max * D]);
  std::unique_ptr<float[]> sbuf(new float[rows_max * Le]);
  std::unique_ptr<float[]> obuf(new float[vnni ? rows_max * D : 1]), rsum(new float[vnni ? rows_max : 1]);
  auto pbuf = at::empty({rows_max * Le}, kt[0].options());
  for (int64_t t = begin; t < end; ++t) {
    const int64_t g0 = (t % parts) * gper, h = (t / parts) % hk, i = t / parts / hk;
    const int64_t blk = (i % 2 == 0) ? i / 2 : nb - 1 - i / 2;
    const int64_t s0 = blk * BQ, bq = std::min(BQ, n - s0), M = gper * bq, kend = p + s0 + bq;
    for (int64_t g = 0; g < gper; ++g)
      for (int64_t j = 0; j < bq; ++j)
        std::copy_n(qp + (s0 + j) * qs0 + (h * G + g0 + g) * qs1, D, qbuf.get() + (g * bq + j) * D);
    at::BFloat16* pp = pbuf.data_ptr<at::BFloat16>();
    if (vnni) {
      const int64_t kblocks = (kend + kKB - 1) / kKB, kpad = kblocks * kKB;  // P's row length
      const at::BFloat16* ktp = kt[h].data_ptr<at::BFloat16>();
      for (int64_t c = 0; c < kblocks; ++c) {
        if (tiles) {
          at::native::cpublas::brgemm(M, kKB, D, D, kKB, kpad, false, qbuf.get(), ktp + c * D * kKB,
                                      sbuf.get() + c * kKB, true);
        } else {
#ifdef DS_HAVE_AVX512BF16
          vnni_gemm64(M, qbuf.get(), D, ktp + c * D * kKB, kKB, [&](int64_t, int64_t) { return D / 2; },
                      sbuf.get() + c * kKB, kpad);
#endif
        }
      }
      // unnormalised probabilities (exp of the shifted scores, at most 1) in
      // bf16, one pass per row; each output row is divided by its sum after P @ V
      for (int64_t r = 0; r < M; ++r) {
        const int64_t visible = p + s0 + r % bq + 1;
        at::BFloat16* pr = pp + r * kpad;
        const float* sr = sbuf.get() + r * kpad;
        rsum[r] = exp_shifted_to_bf16(sr, pr, visible, row_max(sr, visible) * scale, scale);
        std::fill(pr + visible, pr + kpad, at::BFloat16(0.f));
      }
      if (tiles) {
        at::native::cpublas::brgemm(M, D, kpad, kpad, D, D, false, pp, vh[h].data_ptr<at::BFloat16>(),
                                    obuf.get(), true);
      } else {
#ifdef DS_HAVE_AVX512BF16
        // a tile of rows stops at its last visible key (P is zero past it)
        const auto pairs = [&](int64_t r0, int64_t rows) {
          int64_t last = 0;
          for (int64_t r = r0; r < r0 + rows; ++r) last = std::max(last, p + s0 + r % bq + 1);
          return (last + 1) / 2;
        };
        for (int64_t d0 = 0; d0 < D; d0 += 64)
          vnni_gemm64(M, pp, kpad, vh[h].data_ptr<at::BFloat16>() + 2 * d0, D, pairs, obuf.get() + d0, D);
#endif
      }
      using fVec = at::vec::Vectorized<float>;
      for (int64_t g = 0; g < gper; ++g)
        for (int64_t j = 0; j < bq; ++j) {
          const int64_t r = g * bq + j;
          const float* src = obuf.get() + r * D;
          at::BFloat16* dst = op + (s0 + j) * os0 + (h * G + g0 + g) * os1;
          const fVec inv(1.f / rsum[r]);
          int64_t d = 0;
          for (; d + 2 * fVec::size() <= D; d += 2 * fVec::size())
            at::vec::convert_float_bfloat16(fVec::loadu(src + d) * inv, fVec::loadu(src + d + fVec::size()) * inv)
                .store(dst + d);
          for (; d < D; ++d) dst[d] = at::BFloat16(src[d] / rsum[r]);
        }
      continue;
    }
    at::native::cpublas::brgemm(M, kend, D, D, L, kend, false, qbuf.get(), kt[h].data_ptr<at::BFloat16>(),
                                sbuf.get(), false);
    for (int64_t r = 0; r < M; ++r) {
      const int64_t visible = p + s0 + r % bq + 1;
      at::BFloat16* pr = pp + r * kend;
      softmax_to_bf16(sbuf.get() + r * kend, pr, visible, scale);
      std::fill(pr + visible, pr + kend, at::BFloat16(0.f));
    }
    auto o = at::mm(pbuf.narrow(0, 0, M * kend).view({M, kend}), vh[h].narrow(0, 0, kend * D).view({kend, D}));
    const at::BFloat16* ob = o.data_ptr<at::BFloat16>();
    for (int64_t g = 0; g < gper; ++g)
      for (int64_t j = 0; j < bq; ++j)
        std::copy_n(ob + (g * bq + j) * D, D, op + (s0 + j) * os0 + (h * G + g0 + g) * os1);
  }
  at::native::cpublas::brgemm_release(tiles);
}

namespace {

// One request's blocked attention, its two phases over the calling threads.
void blocked_causal_bf16(const at::Tensor& q, const KVRows& kv, int64_t hk, int64_t p, float scale,
                         at::Tensor out) {
  // q, out: [n, Hq, D] (strided views); kv: p + n rows; query j sits at position
  // p + j and sees keys 0 .. p + j.
  BlockedAttention attn(q.size(1), hk, q.size(2), p, q.size(0), scale, at::get_num_threads(), q.options());
  at::parallel_for(0, attn.pack_units(), 1, [&](int64_t begin, int64_t end) { attn.pack(kv, begin, end); });
  const at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, attn.tasks(), 1, [&](int64_t begin, int64_t end) {
    attn.run(qp, q.stride(0), q.stride(1), op, out.stride(0), out.stride(1), begin, end);
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
  [[maybe_unused]] int64_t longest = 0;  // read by the AMX dispatch below
  for (size_t b = 0; b < extend_lens.size(); ++b) {
    TORCH_CHECK(prefix_lens[b] >= 0 && extend_lens[b] >= 0 && prefix_lens[b] + extend_lens[b] <= req_to_token.size(1),
                "sequence longer than req_to_token");
    total += extend_lens[b];
    longest = std::max(longest, extend_lens[b]);
  }
  TORCH_CHECK(total == q.size(0), "extend_lens must sum to the number of tokens");
  rope_and_store(q, k, v, positions, cos_sin_cache, k_cache, v_cache, out_loc);
#ifdef DS_HAVE_AMX
  // a few tokens per request (a short prompt over a cached prefix): the decode
  // kernel's tiles, without packing the prefix's K^T and V for brgemm first
  if (longest <= kAmxSmallExtend && attend_amx_supported(q, k_cache)) {
    auto out = at::empty(q.sizes(), q.options());
    auto rows = req_pool_indices.contiguous();
    attend_amx(q, k_cache, v_cache, req_to_token, rows.data_ptr<int64_t>(), prefix_lens, extend_lens,
               static_cast<float>(scale), out);
    return out;
  }
#endif

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
    if (blocked && BlockedAttention::fits(p, n)) {  // a few fresh tokens are as fast through SDPA
      KVRows kv;
      std::vector<int64_t> koff(p + n), voff(p + n);
      kv.koff = koff.data();
      kv.voff = voff.data();
      if (p == 0) {  // the whole sequence is in this call: attend to the fresh K/V
        kv.kbase = k.data_ptr<at::BFloat16>() + start * k.stride(0);
        kv.vbase = v.data_ptr<at::BFloat16>() + start * v.stride(0);
        kv.khs = k.stride(1);
        kv.vhs = v.stride(1);
        for (int64_t j = 0; j < n; ++j) {
          koff[j] = j * k.stride(0);
          voff[j] = j * v.stride(0);
        }
      } else {
        kv.kbase = k_cache.data_ptr<at::BFloat16>();
        kv.vbase = v_cache.data_ptr<at::BFloat16>();
        kv.khs = k_cache.stride(1);
        kv.vhs = v_cache.stride(1);
        auto slots = req_to_token[rows[b]].narrow(0, 0, p + n).to(at::kLong).contiguous();
        const int64_t* sp = slots.data_ptr<int64_t>();
        for (int64_t j = 0; j < p + n; ++j) {
          TORCH_CHECK(sp[j] >= 0 && sp[j] < k_cache.size(0), "req_to_token holds a slot outside the pool");
          koff[j] = sp[j] * k_cache.stride(0);
          voff[j] = sp[j] * v_cache.stride(0);
        }
      }
      blocked_causal_bf16(q.narrow(0, start, n), kv, k.size(1), p, static_cast<float>(scale),
                          out.narrow(0, start, n));
      start += n;
      continue;
    }
    at::Tensor ki, vi;
    if (p == 0) {  // the whole sequence is in this call: attend to the fresh K/V
      ki = k.narrow(0, start, n);
      vi = v.narrow(0, start, n);
    } else {
      auto slots = req_to_token[rows[b]].narrow(0, 0, p + n).to(at::kLong);
      ki = k_cache.index_select(0, slots);
      vi = v_cache.index_select(0, slots);
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
