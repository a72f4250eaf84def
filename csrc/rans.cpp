// A static-model rANS entropy coder for the CacheGen codec (16-bit renormalisation,
// four interleaved 32-bit states, 15-bit probabilities). The symbols come in
// segments, each coded with its own frequency table; one stream holds them all.
// Encoding runs backwards so decoding runs forwards through the segments.
//
// Four states (symbol i through state i % 4) give the decoder four independent
// dependency chains (table lookup, multiply, renormalise) to overlap; with 16-bit
// renormalisation a step reads at most one word, so the read is branch-free (a
// conditional move), where byte-wise renormalisation took a data-dependent loop
// whose branch mispredicted every few symbols.
//
// Decoding treats the stream as untrusted: every read is bounds-checked, every
// table must sum to 2^15, and the final states must equal the initial ones (a
// consistency check rANS gives for free), else it throws.
//
// The codec's other native passes live here too: fp32 -> bf16 narrowing and the
// lossy levels' reconstruction (cachegen_dequantize), both on the calling thread.
#include "ops.h"
#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace {

constexpr uint32_t kScaleBits = 15;
constexpr uint32_t kTotal = 1u << kScaleBits;
constexpr uint32_t kLow = 1u << 16;  // the state stays in [kLow, kLow << 16)
constexpr int kStates = 4;

struct Tables {
  std::vector<const int32_t*> freq;
  std::vector<int64_t> size;
  std::vector<std::vector<uint32_t>> cum;
};

Tables read_tables(const at::Tensor& freqs, const at::Tensor& table_lens) {
  TORCH_CHECK(freqs.dtype() == at::kInt && freqs.is_contiguous(), "freqs must be contiguous int32");
  TORCH_CHECK(table_lens.dtype() == at::kLong, "table_lens must be int64");
  Tables t;
  const int32_t* f = freqs.data_ptr<int32_t>();
  const int64_t* lens = table_lens.data_ptr<int64_t>();
  int64_t offset = 0, total = freqs.numel();
  for (int64_t s = 0; s < table_lens.numel(); ++s) {
    int64_t k = lens[s];
    if (k < 1 || k > 65536 || offset + k > total) throw std::invalid_argument("rANS: bad table size");
    std::vector<uint32_t> cum(k + 1, 0);
    for (int64_t i = 0; i < k; ++i) {
      if (f[offset + i] < 0) throw std::invalid_argument("rANS: negative frequency");
      cum[i + 1] = cum[i] + static_cast<uint32_t>(f[offset + i]);
      if (cum[i + 1] > kTotal) throw std::invalid_argument("rANS: table does not sum to 2^15");
    }
    if (cum[k] != kTotal) throw std::invalid_argument("rANS: table does not sum to 2^15");
    t.freq.push_back(f + offset);
    t.size.push_back(k);
    t.cum.push_back(std::move(cum));
    offset += k;
  }
  if (offset != total) throw std::invalid_argument("rANS: tables and sizes disagree");
  return t;
}

// The segments' frequency tables, and where each segment starts in the symbols.
struct Segments {
  Tables tables;
  std::vector<int64_t> start, len;
  int64_t total = 0;
};

Segments read_segments(const at::Tensor& seg_lens, const at::Tensor& freqs, const at::Tensor& table_lens) {
  TORCH_CHECK(seg_lens.dtype() == at::kLong && seg_lens.numel() == table_lens.numel(),
              "one int64 length per table");
  Segments seg{read_tables(freqs, table_lens), {}, {}, 0};
  const int64_t* lens = seg_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < seg_lens.numel(); ++s) {
    if (lens[s] < 0) throw std::invalid_argument("rANS: negative segment length");
    seg.start.push_back(seg.total);
    seg.len.push_back(lens[s]);
    seg.total += lens[s];
  }
  return seg;
}

}  // namespace

at::Tensor rans_encode(const at::Tensor& symbols, const at::Tensor& seg_lens, const at::Tensor& freqs,
                       const at::Tensor& table_lens) {
  TORCH_CHECK(symbols.dtype() == at::kInt && symbols.is_contiguous(), "symbols must be contiguous int32");
  Segments seg = read_segments(seg_lens, freqs, table_lens);
  const Tables& t = seg.tables;
  const int64_t n = seg.total;
  TORCH_CHECK(n == symbols.numel(), "segment lengths must add up to the symbol count");
  pybind11::gil_scoped_release no_gil;  // plain memory work: other Python threads may run
  const int32_t* sym = symbols.data_ptr<int32_t>();
  std::vector<uint16_t> out;  // 16-bit words, written backwards, reversed at the end
  out.reserve(static_cast<size_t>(n / 4 + 16));
  // symbol i goes through state i % 4; encoding runs backwards, so the decoder's
  // forward pass cycles through the states the same way
  uint32_t xs[kStates] = {kLow, kLow, kLow, kLow};
  for (int64_t s = static_cast<int64_t>(seg.len.size()) - 1; s >= 0; --s) {
    const int32_t* f = t.freq[s];
    const uint32_t* cum = t.cum[s].data();
    for (int64_t i = seg.start[s] + seg.len[s] - 1; i >= seg.start[s]; --i) {
      int32_t v = sym[i];
      TORCH_CHECK(v >= 0 && v < t.size[s] && f[v] > 0, "symbol outside its table");
      uint32_t& x = xs[i & (kStates - 1)];
      const uint32_t freq = static_cast<uint32_t>(f[v]);
      // x_max = ((kLow >> kScaleBits) << 16) * freq (64-bit: 2^32 for a probability-1
      // symbol); x < 2^32, so one word at most
      if (static_cast<uint64_t>(x) >= (static_cast<uint64_t>(freq) << (32 - kScaleBits))) {
        out.push_back(static_cast<uint16_t>(x & 0xffff));
        x >>= 16;
      }
      x = ((x / freq) << kScaleBits) + (x % freq) + cum[v];
    }
  }
  for (int k = kStates - 1; k >= 0; --k) {  // the stream opens with state 0, high word first
    out.push_back(static_cast<uint16_t>(xs[k] & 0xffff));
    out.push_back(static_cast<uint16_t>(xs[k] >> 16));
  }
  at::Tensor result = at::empty({static_cast<int64_t>(out.size() * 2)}, at::kByte);
  uint8_t* dst = result.data_ptr<uint8_t>();
  for (size_t i = 0; i < out.size(); ++i) {  // little-endian words
    const uint16_t w = out[out.size() - 1 - i];
    dst[2 * i] = static_cast<uint8_t>(w & 0xff);
    dst[2 * i + 1] = static_cast<uint8_t>(w >> 8);
  }
  return result;
}

at::Tensor rans_decode(const at::Tensor& data, const at::Tensor& seg_lens, const at::Tensor& freqs,
                       const at::Tensor& table_lens) {
  TORCH_CHECK(data.dtype() == at::kByte && data.is_contiguous(), "data must be contiguous uint8");
  Segments seg = read_segments(seg_lens, freqs, table_lens);
  const Tables& t = seg.tables;
  at::Tensor result = at::empty({seg.total}, at::kInt);
  pybind11::gil_scoped_release no_gil;  // plain memory work: other Python threads may run
  int32_t* dst = result.data_ptr<int32_t>();
  if (data.numel() % 2) throw std::invalid_argument("rANS: stream is not whole 16-bit words");
  const uint8_t* bytes = data.data_ptr<uint8_t>();
  const int64_t words = data.numel() / 2;
  if (words < 2 * kStates) throw std::invalid_argument("rANS: stream too short");
  auto word = [&](int64_t i) { return static_cast<uint32_t>(bytes[2 * i]) | (static_cast<uint32_t>(bytes[2 * i + 1]) << 8); };
  uint32_t xs[kStates];
  for (int k = 0; k < kStates; ++k) {
    xs[k] = (word(2 * k) << 16) | word(2 * k + 1);
    if (xs[k] < kLow) throw std::invalid_argument("rANS: corrupt stream");
  }
  int64_t pos = 2 * kStates;
  bool overrun = false;
  std::vector<uint16_t> lut(kTotal);
  // After a step x >= 2 (x >> 15 >= 2 for x >= kLow), so one word brings it back
  // to >= kLow; the read is a conditional move, and a read past the end (a corrupt
  // stream) takes a zero word and is reported after the loop.
  auto step = [&](uint32_t& x, const int32_t* f, const uint32_t* cum) {
    const uint32_t slot = x & (kTotal - 1);
    const uint16_t v = lut[slot];
    *dst++ = v;
    x = static_cast<uint32_t>(f[v]) * (x >> kScaleBits) + slot - cum[v];
    const bool need = x < kLow;
    const bool have = pos < words;
    overrun |= need & !have;
    const uint32_t w = have ? word(pos) : 0u;
    x = need ? (x << 16) | w : x;
    pos += need & have;
  };
  int64_t i = 0;  // global symbol index: symbol i goes through state i % 4
  for (size_t s = 0; s < seg.len.size(); ++s) {
    const int32_t* f = t.freq[s];
    const uint32_t* cum = t.cum[s].data();
    for (int64_t v = 0; v < t.size[s]; ++v)
      std::fill(lut.begin() + cum[v], lut.begin() + cum[v + 1], static_cast<uint16_t>(v));
    const int64_t stop = i + seg.len[s];
    for (; i < stop && (i & (kStates - 1)); ++i) step(xs[i & (kStates - 1)], f, cum);
    for (; i + kStates <= stop; i += kStates) {
      step(xs[0], f, cum);
      step(xs[1], f, cum);
      step(xs[2], f, cum);
      step(xs[3], f, cum);
    }
    for (; i < stop; ++i) step(xs[i & (kStates - 1)], f, cum);
    if (overrun) throw std::invalid_argument("rANS: stream ends early");
  }
  for (int k = 0; k < kStates; ++k)
    if (xs[k] != kLow) throw std::invalid_argument("rANS: stream does not end where it should");
  if (pos != words) throw std::invalid_argument("rANS: stream does not end where it should");
  return result;
}

// fp32 -> bf16 (round to nearest even) on the calling thread only. The codec runs
// on the KV store's background threads, where torch's conversion would start an
// OpenMP team of its own beside the engine's.
at::Tensor fp32_to_bf16(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "fp32_to_bf16 takes a CPU float32 tensor");
  auto src = x.contiguous();
  auto out = at::empty(src.sizes(), src.options().dtype(at::kBFloat16));
  const float* s = src.data_ptr<float>();
  at::BFloat16* d = out.data_ptr<at::BFloat16>();
  const int64_t n = src.numel();
  using fVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + 2 * fVec::size() <= n; i += 2 * fVec::size())
    at::vec::convert_float_bfloat16(fVec::loadu(s + i), fVec::loadu(s + i + fVec::size())).store(d + i);
  for (; i < n; ++i) d[i] = at::BFloat16(s[i]);
  return out;
}

// The lossy CacheGen levels' reconstruction (cachegen/codec.py:_decode_lossy) in one
// pass on the calling thread: element (l, t, c) of the [L, T, C] fp32 output is
// mean + anchor * anchor_step, plus delta * delta_step unless t opens a group, where
// the symbol rows are per (layer, channel) and come in any order: row a_index[l * C + c]
// of `anchors` holds the group anchors of (l, c)'s tokens and row d_index[l * C + c]
// of `deltas` the other tokens in order (the codec decodes the rows bucket by
// bucket and passes where each landed, rather than scattering them back first).
// The arithmetic is numpy's (products and sums in double, each stage rounded to
// fp32), so both paths give the same bits (no contraction into FMAs, which round once).
__attribute__((optimize("fp-contract=off"))) at::Tensor cachegen_dequantize(const at::Tensor& anchors, const at::Tensor& deltas, const at::Tensor& a_index,
                               const at::Tensor& d_index, const at::Tensor& mean,
                               const at::Tensor& anchor_step, const at::Tensor& delta_step, int64_t group,
                               int64_t T) {
  TORCH_CHECK(anchors.scalar_type() == at::kLong && deltas.scalar_type() == at::kLong &&
                  anchors.is_contiguous() && deltas.is_contiguous() && anchors.dim() == 2 && deltas.dim() == 2,
              "symbol rows must be contiguous int64 [L * C, n]");
  TORCH_CHECK(mean.dim() == 2 && mean.scalar_type() == at::kFloat && mean.is_contiguous() &&
                  anchor_step.sizes() == mean.sizes() && delta_step.sizes() == mean.sizes() &&
                  anchor_step.scalar_type() == at::kFloat && delta_step.scalar_type() == at::kFloat &&
                  anchor_step.is_contiguous() && delta_step.is_contiguous(),
              "mean and steps must be contiguous float32 [L, C]");
  TORCH_CHECK(group >= 1 && T >= 0, "bad group or token count");
  const int64_t L = mean.size(0), C = mean.size(1), nA = (T + group - 1) / group, nD = T - nA;
  TORCH_CHECK(anchors.size(0) == L * C && deltas.size(0) == L * C && anchors.size(1) == nA && deltas.size(1) == nD,
              "symbol rows do not match the shape");
  TORCH_CHECK(a_index.scalar_type() == at::kLong && d_index.scalar_type() == at::kLong && a_index.is_contiguous() &&
                  d_index.is_contiguous() && a_index.numel() == L * C && d_index.numel() == L * C,
              "row indices must be contiguous int64 [L * C]");
  const int64_t* ai = a_index.data_ptr<int64_t>();
  const int64_t* di = d_index.data_ptr<int64_t>();
  for (int64_t r = 0; r < L * C; ++r)
    TORCH_CHECK(ai[r] >= 0 && ai[r] < L * C && di[r] >= 0 && di[r] < L * C, "row index outside the symbol rows");
  at::Tensor out = at::empty({L, T, C}, mean.options());
  pybind11::gil_scoped_release no_gil;
  const int64_t* a = anchors.data_ptr<int64_t>();
  const int64_t* d = deltas.data_ptr<int64_t>();
  const float* mu = mean.data_ptr<float>();
  const float* as = anchor_step.data_ptr<float>();
  const float* ds = delta_step.data_ptr<float>();
  float* o = out.data_ptr<float>();
  // blocks of 16 channels: reads run along 16 symbol rows, writes along each token's row
  constexpr int64_t kCB = 16;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t c0 = 0; c0 < C; c0 += kCB) {
      const int64_t nc = std::min(kCB, C - c0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t g = t / group;
        float* dst = o + (l * T + t) * C + c0;
        if (t % group == 0) {
          for (int64_t j = 0; j < nc; ++j) {
            const int64_t row = l * C + c0 + j;
            dst[j] = static_cast<float>(static_cast<double>(mu[row]) +
                                        static_cast<double>(a[ai[row] * nA + g]) * static_cast<double>(as[row]));
          }
        } else {
          const float* base = o + (l * T + g * group) * C + c0;  // the group's anchor, written above
          const int64_t k = t - g - 1;
          for (int64_t j = 0; j < nc; ++j) {
            const int64_t row = l * C + c0 + j;
            dst[j] = static_cast<float>(static_cast<double>(base[j]) +
                                        static_cast<double>(d[di[row] * nD + k]) * static_cast<double>(ds[row]));
          }
        }
      }
    }
  return out;
}
