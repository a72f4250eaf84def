"""Per-forward metadata. One `ForwardBatch` travels explicitly through the model
and its attention layers; nothing about a batch lives in module globals."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

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
        """Index in the flat layout of each request's last token."""
        ends = torch.tensor(self.extend_lens, dtype=torch.int64).cumsum(0)
        return ends - 1

    def select(self, indices: list[int]) -> tuple["ForwardBatch", torch.Tensor]:
        """The sub-batch of requests `indices`, and the flat token rows it takes
        from this batch (to map rows back)."""
        starts = self.extend_start
        rows = torch.cat([torch.arange(starts[i], starts[i] + self.extend_lens[i]) for i in indices])
        idx = torch.tensor(indices, dtype=torch.int64)
        sub = ForwardBatch(
            mode=self.mode, input_ids=self.input_ids[rows], positions=self.positions[rows],
            out_cache_loc=self.out_cache_loc[:, rows], req_pool_indices=self.req_pool_indices[idx],
            seq_lens=self.seq_lens[idx], prefix_lens=[self.prefix_lens[i] for i in indices],
            extend_lens=[self.extend_lens[i] for i in indices], kv_pool=self.kv_pool,
            req_to_token=self.req_to_token,
            model_ids=None if self.model_ids is None else [self.model_ids[i] for i in indices],
            lora_ids=None if self.lora_ids is None else [self.lora_ids[i] for i in indices],
            e_pool=self.e_pool, e_loc=None if self.e_loc is None else self.e_loc[:, rows])
        return sub, rows


def recompute_start(start: int, end: int, tail: float) -> int:
    """First token recomputed when the last `tail` share of [start, end) is (at least one)."""
    return min(end - 1, start + int((end - start) * (1 - tail)))


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
