"""Per-forward metadata. One `ForwardBatch` travels explicitly through the model
and its attention layers; nothing about a batch lives in module globals."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from droidspeak import kernels
from droidspeak.kvcache.pool import HiddenPool, KVPool


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill (possibly a chunk, possibly over a cached prefix)
    DECODE = "decode"  # one new token per request


@dataclass
class ForwardBatch:
    """Flat (ragged) token layout: request i owns tokens
    [extend_start[i], extend_start[i] + extend_lens[i]) of `input_ids`.

    Invariant: `seq_lens[i] == prefix_lens[i] + extend_lens[i]`, and the segment-g
    pool slots of request i's whole sequence are
    `req_to_token[g, req_pool_indices[i], :seq_lens[i]]`, the last `extend_lens[i]`
    of them being this batch's `out_cache_loc[g]` entries.
    """
    mode: ForwardMode
    input_ids: torch.Tensor        # [T] int64
    positions: torch.Tensor        # [T] int64
    out_cache_loc: torch.Tensor    # [G, T] int64, per KV segment the slots the new tokens' KV goes to
    req_pool_indices: torch.Tensor # [B] int64
    seq_lens: torch.Tensor         # [B] int64, total length after this forward
    prefix_lens: list[int]         # [B] tokens already in the pool before this forward
    extend_lens: list[int]         # [B] tokens computed by this forward
    kv_pool: KVPool
    req_to_token: torch.Tensor     # [G, max_reqs, max_context] int32
    model_ids: list[int] | None = None  # [B] which family member runs request i (None: model 0)
    lora_ids: list[int | None] | None = None  # [B] LoRA adapter of request i on its model (None: none)
    lora: Any = None                    # the runner's per-forward LoRA state (lora.batch.LoRABatch)
    e_pool: HiddenPool | None = None    # where the E cache goes
    e_loc: torch.Tensor | None = None   # [E, T] rows of e_pool for each token's E cache (0: keep none)
    recompute: list["Recompute"] = field(default_factory=list)  # cross-model spans, run first
    fused_recompute: list["Recompute"] = field(default_factory=list)  # spans run as the head of their extend
    groups: "RowGroups | None" = None   # which member runs each row (None: one member, plain matmuls)
    loads: list = field(default_factory=list)  # KV-store loads still streaming in (kvstore.offload.PoolLoad)
    # The last `kv_only` requests only write KV (a cross-model hit's recomputed
    # attention sink, `Recompute.sink_job`): no logits are taken from them.
    kv_only: int = 0

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def extend_start(self) -> list[int]:
        starts, acc = [], 0
        for n in self.extend_lens:
            starts.append(acc)
            acc += n
        return starts

    @property
    def last_token_index(self) -> torch.Tensor:
        """Index in the flat layout of each request's last token (KV-only ones left out)."""
        ends = torch.tensor(self.extend_lens, dtype=torch.int64).cumsum(0)
        return ends[:self.batch_size - self.kv_only] - 1


@dataclass
class RowGroups:
    """Which family member runs each flat row of a co-batched forward. Norms,
    attention and the KV store run once over every row; each linear layer runs
    group by group with that member's weights (`layers.linear.grouped_linear`)."""
    members: list[int]          # family member (model id) of each group
    rows: list[torch.Tensor]    # [n_g] int64 rows of each group
    row_group: torch.Tensor     # [T] int64 group of each row
    native: list[bool]          # per group: through the grouped decode kernel

    @classmethod
    def build(cls, row_members: torch.Tensor, decode_kernel: bool) -> "RowGroups | None":
        """Groups of `row_members` ([T] model id per row); None when one member runs
        every row with torch's matmuls (nothing to group). `decode_kernel`: groups
        of at most kernels.GROUPED_KERNEL_MAX_ROWS rows use the native kernel."""
        members = sorted(set(row_members.tolist()))
        rows = [(row_members == m).nonzero().flatten() for m in members]
        native = [decode_kernel and r.numel() <= kernels.GROUPED_KERNEL_MAX_ROWS for r in rows]
        if len(members) == 1 and not native[0]:
            return None
        row_group = torch.empty_like(row_members)
        for g, r in enumerate(rows):
            row_group[r] = g
        return cls(members, rows, row_group, native)

    def of_rows(self, index: torch.Tensor) -> "RowGroups":
        """The groups of rows `index` of this batch (e.g. each request's last token),
        keeping every member's kernel choice."""
        sub = self.row_group.index_select(0, index)
        kept = [g for g in range(len(self.members)) if bool((sub == g).any())]
        rows = [(sub == g).nonzero().flatten() for g in kept]
        row_group = torch.empty_like(sub)
        for i, r in enumerate(rows):
            row_group[r] = i
        return RowGroups([self.members[g] for g in kept], rows, row_group, [self.native[g] for g in kept])


def recompute_start(start: int, end: int, tail: float) -> int:
    """First token recomputed when the last `tail` share of [start, end) is (at least one)."""
    return min(end - 1, start + int((end - start) * (1 - tail)))


# Tokens at the sequence's start that a tail recompute also runs: the first token
# is the attention sink, which every later token attends to heavily, and the
# sender's KV there is another model's. Recomputing it (it attends only to itself,
# so this is exactly the receiver's own KV) costs one row and buys about what
# doubling the tail does (docs/cross-model.md).
SINK_TOKENS = 1


def sink_tokens(hit_start: int, first: int, layer_start: int) -> int:
    """How many leading tokens a recompute of [first, end) over a cross-model hit
    starting at `hit_start` also runs: the sink, when the hit begins the sequence,
    the group starts from the receiver's embeddings and the tail leaves it out."""
    return SINK_TOKENS if hit_start == 0 and layer_start == 0 and first > SINK_TOKENS else 0


@dataclass
class Recompute:
    """A cross-model hit's recompute: the receiver's layers [layer_start, layer_end)
    over tokens [start, end) of its row, starting from the sender's E cache (the
    stream entering layer_start). Its KV goes to the row's slots of those layers."""
    req_pool_idx: int
    start: int
    end: int
    layer_start: int
    layer_end: int
    e_rows: torch.Tensor | None  # [end - start] the sender's E-cache rows at layer_start
    input_ids: torch.Tensor | None = None  # the tokens, for layer_start == 0 (own embeddings)
    model_id: int = 0
    lora_id: int | None = None
    sink: torch.Tensor | None = None  # ids of tokens [0, n) (`sink_tokens`), recomputed too

    def sink_job(self) -> "Recompute | None":
        """The recompute of the sink tokens, as a job of its own (same row, model and layers)."""
        if self.sink is None:
            return None
        return Recompute(self.req_pool_idx, 0, len(self.sink), self.layer_start, self.layer_end, None,
                         self.sink, self.model_id, self.lora_id)


def stack_e_loc(e_locs: list[torch.Tensor | None], lens: list[int]) -> torch.Tensor | None:
    """[E, T] E-cache rows for a batch (0 where a request keeps none), or None."""
    present = [e for e in e_locs if e is not None]
    if not present:
        return None
    num_e = present[0].shape[0]
    return torch.cat([e if e is not None else torch.zeros((num_e, n), dtype=torch.int64)
                      for e, n in zip(e_locs, lens)], dim=1)
