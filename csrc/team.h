#pragma once
// The decode kernels' work items (AMX tiles and AVX512-BF16), for callers that
// run them inside their own parallel region (the decode team in
// layer_stack.cpp) as well as through the standalone ops (grouped_linear,
// decode_attention), which use the same functions, so both paths compute every
// output the same way.
#include "ops.h"

#include "amx.h"

#include <cstdint>
#include <vector>

// Tokens per request up to which an extend's attention runs on AmxAttention
// (extend_attention.cpp; longer ones go through its packed GEMM path).
constexpr int64_t kAmxSmallExtend = 16;

// Where a request's keys and values live: row j (position j of the sequence) of
// head h starts at base + off[j] + h * head_stride, for the pool (slot * row
// length) and for the call's own fresh K/V alike, so nothing is gathered first.
// The offsets belong to the caller (the decode team shares one list between K,
// V and every layer of a segment).
struct KVRows {
  const at::BFloat16* kbase;
  const at::BFloat16* vbase;
  const int64_t* koff;
  const int64_t* voff;
  int64_t khs, vhs;  // head strides
  const at::BFloat16* key(int64_t j, int64_t h) const { return kbase + koff[j] + h * khs; }
  const at::BFloat16* value(int64_t j, int64_t h) const { return vbase + voff[j] + h * vhs; }
};

// extend_attention's blocked causal attention of one request (extends past
// kAmxSmallExtend tokens; see extend_attention.cpp): its n queries at positions
// p .. p + n - 1 over its p + n keys. Two phases, each a list of units that any
// threads may split: pack() lays out K^T and V per KV head (and block of keys),
// then run() computes (query-head part, KV head, query block) tasks, q and out
// [n, hq, D] bf16 (rows qs0 / os0 apart, heads qs1 / os1). The calling
// thread's tile state is released at the end of run().
class BlockedAttention {
 public:
  // Whether a request takes this path: p + n reaches one query block (fewer go
  // through SDPA).
  static bool fits(int64_t p, int64_t n);
  BlockedAttention(int64_t hq, int64_t hk, int64_t D, int64_t p, int64_t n, float scale, int64_t threads,
                   const at::TensorOptions& opts);
  int64_t pack_units() const;
  void pack(const KVRows& kv, int64_t begin, int64_t end);
  int64_t tasks() const { return hk_ * nb_ * parts_; }
  void run(const at::BFloat16* q, int64_t qs0, int64_t qs1, at::BFloat16* out, int64_t os0, int64_t os1,
           int64_t begin, int64_t end) const;

 private:
  int64_t hk_, D_, p_, n_, L_, G_;
  float scale_;
  bool tiles_ = false, dots_ = false;
  int64_t nb_ = 0, nkb_ = 0, parts_ = 1;
  std::vector<at::Tensor> kt_, vh_;  // per KV head: K^T and V, packed
};

// Whether grouped_linear runs a [*, K] x [N, K]^T product on AMX tiles.
bool grouped_linear_uses_amx(int64_t K, int64_t N);

// The grouped linear on AVX512-BF16 dot products (CPUs without AMX).
namespace vec_linear {

constexpr int64_t kTaskN = 32;  // output features per task (an even split of 576, 960, 3072 features)
inline int64_t tasks(int64_t N) { return (N + kTaskN - 1) / kTaskN; }
// Task t of a group: outputs [32 t, 32 t + 32) for its rn rows (row m at x + r[m] * ldx,
// and at op + r[m] * N in the [T, N] bf16 output), from the [N, K] weight and an optional bias.
void task(const uint16_t* x, int64_t ldx, const int64_t* r, int64_t rn, const uint16_t* w, const uint16_t* bias,
          int64_t K, int64_t N, int64_t t, uint16_t* op);

}  // namespace vec_linear

// Decode attention without AMX: one task per (request, KV head), the register-tiled
// kernel (decode_bf16_grouped) for the shapes it has (query heads per KV head G,
// head dim D); q, the pool layer and out as in AmxAttention::Layer, out [B, hq, D]
// contiguous, lens the requests' lengths (their last token the query).
bool vec_decode_supported(int64_t G, int64_t D);
void vec_decode_tasks(int64_t G, int64_t D, const uint16_t* q, int64_t qs0, int64_t qs1, const uint16_t* k,
                      const uint16_t* v, int64_t hkv, const int32_t* table, int64_t width, const int64_t* rows,
                      const int64_t* lens, float scale, at::BFloat16* out, int64_t begin, int64_t end);

#ifdef DS_HAVE_AMX
namespace amx_linear {

constexpr int64_t kK = 32;      // K values per tile product (16 pairs)
constexpr int64_t kRows = 16;   // tile rows: output features of A, K pairs of B
constexpr int64_t kCols = 16;   // batch rows per B tile
constexpr int64_t kTaskN = 32;  // output features per task: two accumulator tiles

inline bool supported(int64_t K, int64_t N) { return K % kK == 0 && N % kRows == 0 && amx_permitted(); }
inline int64_t tasks(int64_t N) { return (N + kTaskN - 1) / kTaskN; }
// uint32 words of one group's B operand for `rn` rows of K values
inline int64_t packed_words(int64_t rn, int64_t K) { return (rn + kCols - 1) / kCols * (K / kK) * kRows * kCols; }

// K blocks [kb0, kb1) of a group's rn rows (row m at x + r[m] * ldx, K values)
// into its B operand (64-byte aligned): for K block kb, tile row p holds each
// row's K values 2p and 2p + 1 of that block, zero for the rows past rn. (Split
// by K blocks, not rows: the rows of one tile row share its cache line.)
void pack_rows(const uint16_t* x, int64_t ldx, const int64_t* r, int64_t rn, int64_t K, int64_t kb0, int64_t kb1,
               uint32_t* packed);
// The tile shapes `task` uses, on the calling thread.
void load_config();
// Task t of a group: outputs [32 t, 32 t + 32) for all of the group's rn rows
// (`r`: their rows in the [T, N] bf16 output `op`), from the packed rows, the
// [N, K] weight and an optional bias.
void task(const uint32_t* packed, int64_t rn, const uint16_t* w, const uint16_t* bias, int64_t K, int64_t N,
          int64_t t, const int64_t* r, uint16_t* op);

}  // namespace amx_linear

// Attention of ragged query rows over the pool on AMX tiles (see attend_amx):
// the task list is fixed by the batch, the tensors (a layer's) are given per run.
class AmxAttention {
 public:
  struct Layer {
    const uint16_t* q;  // [T, hq, D] bf16, rows qs0 apart, heads qs1
    int64_t qs0, qs1;
    const uint16_t* k;  // the layer's pool, [slots, hkv, D]
    const uint16_t* v;
    const int32_t* table;  // req_to_token rows, `width` slots each
    int64_t width;
    at::BFloat16* out;  // [T, hq, D], rows os0 apart, heads os1
    int64_t os0, os1;
  };

  // Whether the tiles take this head shape (bf16 q and pool checked by callers).
  static bool supported(int64_t hq, int64_t hkv, int64_t D) {
    return hq % hkv == 0 && D % 32 == 0 && D <= 128 && amx_permitted();
  }
  AmxAttention(int64_t hq, int64_t hkv, int64_t D, const int64_t* rows, std::vector<int64_t> prefix_lens,
               std::vector<int64_t> extend_lens, float scale);
  int64_t tasks() const { return task_start_.back(); }
  // Tasks [begin, end) on the calling thread (it loads its own tile configs;
  // the caller releases the tile state when done with AMX).
  void run(int64_t begin, int64_t end, const Layer& io) const;

 private:
  int64_t hkv_, D_, G_;
  float scale_;
  const int64_t* rows_;
  std::vector<int64_t> prefix_lens_, extend_lens_, q_start_, task_start_;
  int64_t cap_ = 0;
};
#endif
