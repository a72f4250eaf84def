"""Admission of waiting requests into a prefill batch: prefix matching, locking,
the token budgets, chunking, and slot allocation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from droidspeak.kvcache.base import PrefixCache
from droidspeak.kvcache.pool import ReqToTokenPool, SlotAllocator
from droidspeak.runner.batch import ForwardBatch, ForwardMode
from droidspeak.scheduler.request import Req

# Decode tokens reserved per running request are capped here: a request asking for
# 100K new tokens should not block admission of everything else.
CLIP_MAX_NEW_TOKENS = 4096


@dataclass
class PrefillEntry:
    req: Req
    num_tokens: int  # tokens of fill_ids computed by this forward, from req.kv_len on

    @property
    def completes_prompt(self) -> bool:
        return self.req.kv_len + self.num_tokens == self.req.seq_len


def decode_reserve(req: Req, new_token_ratio: float) -> float:
    left = req.sampling_params.max_new_tokens - len(req.output_ids)
    return min(max(left, 0), CLIP_MAX_NEW_TOKENS) * new_token_ratio


class PrefillAdder:
    """Fills one prefill batch within the prefill token budget, the chunk size and
    the KV memory left after reserving decode room for running requests."""

    def __init__(self, cache: PrefixCache, allocator: SlotAllocator, req_pool: ReqToTokenPool,
                 max_prefill_tokens: int, chunk_size: int, memory_budget: float,
                 new_token_ratio: float, nothing_running: bool,
                 max_models: int = 1 << 30, active_models: set[int] | None = None):
        self.cache, self.allocator, self.req_pool = cache, allocator, req_pool
        self.rem_tokens = max_prefill_tokens
        self.rem_chunk = chunk_size if chunk_size > 0 else 1 << 62
        self.budget = memory_budget
        self.ratio = new_token_ratio
        self.nothing_running = nothing_running
        self.entries: list[PrefillEntry] = []
        self.new_chunked_req: Req | None = None
        self.max_models = max_models
        self.active_models = set(active_models or ())  # cache namespaces running or admitted

    def model_fits(self, req: Req) -> bool:
        """Whether admitting `req` keeps distinct models per batch within the cap."""
        return req.cache_namespace in self.active_models or len(self.active_models) < self.max_models

    def add_chunked(self, req: Req) -> bool:
        """Continue a request whose prompt is being prefilled in chunks."""
        take = min(req.extend_len, self.rem_chunk, self.rem_tokens)
        reserve = decode_reserve(req, self.ratio) if take == req.extend_len else 0.0
        if take + reserve > self.budget:
            take, reserve = min(take, int(self.budget)), 0.0
        if take < 1 or not self._allocate(req, take):
            return False
        if take < req.extend_len:
            self.new_chunked_req = req
        self._commit(req, take, reserve)
        return True

    def add(self, req: Req) -> bool:
        """Admit a new (or retracted) request; False stops filling the batch."""
        if not self.req_pool.can_allocate():
            return False
        match = self.cache.match_prefix(req.cache_key[:req.max_prefix_len])
        prefix_len = int(match.indices.numel())
        extend = req.seq_len - prefix_len
        take = min(extend, self.rem_chunk, self.rem_tokens)
        if take < 1:
            return False  # this batch's token or chunk budget is spent
        chunked = take < extend
        if chunked and self.new_chunked_req is not None:
            return False  # one request is chunked at a time
        reserve = 0.0 if chunked else decode_reserve(req, self.ratio)
        if take + reserve > self.budget:
            if self.entries or not self.nothing_running:
                return False
            # Nothing else holds memory: make progress by chunking to fit.
            take, reserve, chunked = min(take, int(self.budget)), 0.0, True
            if take < 1 or self.new_chunked_req is not None:
                return False
        self.cache.lock(match.last_node)
        row = self.req_pool.allocate()
        self.req_pool.table[row, :prefix_len] = match.indices.to(torch.int32)
        req.req_pool_idx, req.prefix_len, req.kv_len, req.last_node = row, prefix_len, prefix_len, match.last_node
        if not self._allocate(req, take):
            self.cache.release_req(req)
            return False
        if not req.admitted_once:
            req.cached_tokens, req.admitted_once = prefix_len, True
        if chunked:
            self.new_chunked_req = req
        self._commit(req, take, reserve)
        return True

    def _allocate(self, req: Req, take: int) -> bool:
        short = take - self.allocator.available_size
        if short > 0:
            self.cache.evict(short)
        if not self.allocator.can_allocate(take):
            return False
        slots = self.allocator.allocate(take)
        self.req_pool.table[req.req_pool_idx, req.kv_len:req.kv_len + take] = slots.to(torch.int32)
        return True

    def _commit(self, req: Req, take: int, reserve: float) -> None:
        self.entries.append(PrefillEntry(req, take))
        self.active_models.add(req.cache_namespace)
        self.budget -= take + reserve
        self.rem_tokens -= take
        self.rem_chunk -= take


def build_prefill_batch(entries: list[PrefillEntry], runner) -> tuple[ForwardBatch, torch.Tensor, list[list[int]]]:
    """ForwardBatch for the entries, plus the flat rows whose logits input-token
    logprobs need and, per entry, the positions those rows stand for."""
    ids, positions, locs, extra_rows, extra_pos = [], [], [], [], []
    start = 0
    table = runner.req_to_token_pool.table
    for e in entries:
        r, n = e.req, e.num_tokens
        ids.extend(r.fill_ids[r.kv_len:r.kv_len + n])
        positions.append(torch.arange(r.kv_len, r.kv_len + n))
        locs.append(table[r.req_pool_idx, r.kv_len:r.kv_len + n])
        pos_here = []
        if r.wants_input_logprobs:
            lo = max(r.kv_len, r.logprob_start_len - 1, 0)
            hi = min(r.kv_len + n, len(r.origin_input_ids) - 1)
            pos_here = list(range(lo, hi))
            extra_rows.extend(start + p - r.kv_len for p in pos_here)
        extra_pos.append(pos_here)
        start += n
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=torch.tensor(ids, dtype=torch.int64),
        positions=torch.cat(positions),
        out_cache_loc=torch.cat(locs).to(torch.int64),
        req_pool_indices=torch.tensor([e.req.req_pool_idx for e in entries], dtype=torch.int64),
        seq_lens=torch.tensor([e.req.kv_len + e.num_tokens for e in entries], dtype=torch.int64),
        prefix_lens=[e.req.kv_len for e in entries],
        extend_lens=[e.num_tokens for e in entries],
        kv_pool=runner.kv_pool,
        req_to_token=table,
        model_ids=[e.req.model_id for e in entries],
        lora_ids=[e.req.lora_id for e in entries],
    )
    return batch, torch.tensor(extra_rows, dtype=torch.int64), extra_pos
