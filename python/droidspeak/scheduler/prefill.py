"""Admission of waiting requests into a prefill batch: prefix matching, locking,
the token budgets, chunking, and slot allocation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from droidspeak.kvcache.base import PrefixCache, rows_from
from droidspeak.kvcache.pool import ReqToTokenPool, SlotAllocator
from droidspeak.runner.batch import ForwardBatch, ForwardMode, Recompute, recompute_start
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
                 max_models: int = 1 << 30, active_models: set[int] | None = None,
                 cross_policy=None, idle: bool = False, offloader=None):
        self.cache, self.allocator, self.req_pool = cache, allocator, req_pool
        self.offloader = offloader  # kvstore.offload.KVOffloader or None
        self.cross_policy = cross_policy  # crossmodel.policy.CrossModelPolicy or None
        self.idle = idle
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

    def add(self, req: Req, allow_cross: bool = True) -> bool:
        """Admit a new (or retracted) request; False stops filling the batch."""
        if not self.req_pool.can_allocate():
            return False
        req.recompute = None
        if self.offloader is not None and req.store_prefetch is not None:
            self._load_from_store(req)
        senders = self.cross_policy.senders_for(req.cache_variant) if self.cross_policy and allow_cross else None
        match = self.cache.match_prefix(req.cache_key[:req.max_prefix_len], req.cache_variant, senders)
        prefix_len = match.length + (match.cross.length if match.cross else 0)
        if match.other_variants and self.cross_policy is not None:
            self.cross_policy.note_missed(match.other_variants, req.cache_variant)
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
        self.req_pool.table[:, row, :match.length] = match.indices.to(torch.int32)
        req.req_pool_idx, req.prefix_len, req.kv_len, req.last_node = row, prefix_len, prefix_len, match.last_node
        if match.cross is not None and not self._start_recompute(req, match):
            # The recomputed layers do not fit beside the sender's locked entry:
            # unlock it and admit the request as a plain miss (evicting may then help).
            self.cache.release_req(req)
            return self.add(req, allow_cross=False)
        if not self._allocate(req, take):
            self.cache.release_req(req)
            return False
        if not req.admitted_once:
            req.cached_tokens, req.admitted_once = req.prefix_len, True
            req.cross_model_tokens = req.prefix_len - match.length
        if chunked:
            self.new_chunked_req = req
        self._commit(req, take, reserve)
        return True

    def _load_from_store(self, req: Req) -> None:
        """Put what the request's KV-store prefetch brought (its own model's chunks,
        or a cross-model sender's with the E cache) into fresh slots and the tree,
        so the match that follows sees an ordinary hit (exact, or cross-model with
        the usual recompute). The scheduler admits a request only once its
        prefetch is done."""
        future, req.store_prefetch = req.store_prefetch, None
        result = future.result() if future is not None else None
        if result is not None:
            req.store_tokens = self._insert_loaded(req.cache_key[:req.max_prefix_len], *result)

    def _insert_loaded(self, key: list[int], variant: int, loaded) -> int:
        """Insert `loaded` as `variant`'s KV of `key`, from where the tree's entry
        ends now (the tree may have gained or lost tokens since the prefetch
        started; a gap before the load makes it unusable). Returns tokens inserted."""
        match = self.cache.match_prefix(key, variant)
        start = match.length
        if start < loaded.start or start >= loaded.end:
            return 0
        skip = start - loaded.start
        loaded = dataclasses.replace(loaded, start=start, kv=loaded.kv[:, skip:],
                                     e=None if loaded.e is None else loaded.e[:, skip:])
        self.cache.lock(match.last_node)
        try:
            n = loaded.end - loaded.start
            if not self._make_room(n):
                return 0
            slots = self.allocator.allocate(n)
            erows = None
            if loaded.e is not None and self.cache.e_allocator.can_allocate(n):
                erows = self.cache.e_allocator.allocate(n)
            self.offloader.write(loaded, slots, erows)
            self.cache.insert(key[:loaded.end], variant, torch.cat([match.indices, slots], dim=1),
                              None if erows is None else rows_from(erows, loaded.start))
            self.allocator.free(slots)
            if erows is not None:
                self.cache.e_allocator.free(erows)
            self.budget -= n  # now held by the tree, and soon locked by the request
            return n
        finally:
            self.cache.unlock(match.last_node)

    def _start_recompute(self, req: Req, match) -> bool:
        """Point the row at the sender's KV for the cross-model hit, with fresh
        slots for the recompute group's segments, and queue the recompute."""
        hit = match.cross
        choice = self.cross_policy.choose(hit.sender, req.cache_variant, self.idle, hit.length)
        group = (choice.start, choice.end)
        spaces = self.cross_policy.segments.covering(*group)
        end = hit.start + hit.length
        # Only the last `tail` share of the span is recomputed; before it the
        # sender's KV serves every layer.
        first = recompute_start(hit.start, end, choice.tail)
        if spaces and not self._make_room(end - first):
            return False
        table, row = self.req_pool.table, req.req_pool_idx
        table[:, row, hit.start:end] = hit.indices.to(torch.int32)
        req.cross_start, req.cross_spaces = first, spaces  # what the request owns: spaces over [first, end)
        if spaces:
            table[spaces.start:spaces.stop, row, first:end] = \
                self.allocator.allocate(end - first, spaces).to(torch.int32)
            e_index = self.cross_policy.e_index(group[0])
            req.recompute = Recompute(row, first, end, group[0], group[1],
                                      None if e_index is None else hit.erows[e_index, first - hit.start:].clone(),
                                      torch.tensor(req.fill_ids[first:end], dtype=torch.int64),
                                      req.model_id, req.lora_id)
            self.budget -= end - first
        self.cross_policy.record_hit(hit.sender, req.cache_variant, hit.length, group, req.origin_input_ids, end,
                                     choice.tail)
        return True

    def _make_room(self, n: int) -> bool:
        short = n - self.allocator.available_size
        if short > 0:
            self.cache.evict(short)
        return self.allocator.can_allocate(n)

    def _allocate(self, req: Req, take: int) -> bool:
        if not self._make_room(take):
            return False
        slots = self.allocator.allocate(take)
        self.req_pool.table[:, req.req_pool_idx, req.kv_len:req.kv_len + take] = slots.to(torch.int32)
        if self.cross_policy is not None and self.cross_policy.is_sender(req.cache_variant):
            req.erows.append(self.cache.e_allocator.allocate(take))
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
    ids, positions, locs, extra_rows, extra_pos, e_locs = [], [], [], [], [], []
    start = 0
    table = runner.req_to_token_pool.table
    for e in entries:
        r, n = e.req, e.num_tokens
        ids.extend(r.fill_ids[r.kv_len:r.kv_len + n])
        positions.append(torch.arange(r.kv_len, r.kv_len + n))
        locs.append(table[:, r.req_pool_idx, r.kv_len:r.kv_len + n])
        e_locs.append(r.erows[-1] if r.erows else None)
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
        out_cache_loc=torch.cat(locs, dim=1).to(torch.int64),
        req_pool_indices=torch.tensor([e.req.req_pool_idx for e in entries], dtype=torch.int64),
        seq_lens=torch.tensor([e.req.kv_len + e.num_tokens for e in entries], dtype=torch.int64),
        prefix_lens=[e.req.kv_len for e in entries],
        extend_lens=[e.num_tokens for e in entries],
        kv_pool=runner.kv_pool,
        req_to_token=table,
        model_ids=[e.req.model_id for e in entries],
        lora_ids=[e.req.lora_id for e in entries],
        recompute=[e.req.recompute for e in entries if e.req.recompute is not None],
    )
    batch.e_pool, batch.e_loc = runner.e_pool, stack_e_loc(e_locs, [e.num_tokens for e in entries])
    return batch, torch.tensor(extra_rows, dtype=torch.int64), extra_pos


def stack_e_loc(e_locs: list[torch.Tensor | None], lens: list[int]) -> torch.Tensor | None:
    """[E, T] E-cache rows for a batch (0 where a request keeps none), or None."""
    present = [e for e in e_locs if e is not None]
    if not present:
        return None
    num_e = present[0].shape[0]
    return torch.cat([e if e is not None else torch.zeros((num_e, n), dtype=torch.int64)
                      for e, n in zip(e_locs, lens)], dim=1)
