"""Admission of waiting requests into a prefill batch: prefix matching, locking,
the token budgets, chunking, and slot allocation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from droidspeak.kvcache.base import PrefixCache
from droidspeak.kvcache.pool import ReqToTokenPool, SlotAllocator
from droidspeak.runner.batch import ForwardBatch, ForwardMode, Recompute, recompute_start, sink_tokens
from droidspeak.scheduler.request import Req

WAIT_FOR_MEMORY = object()  # a usable KV-store load that does not fit yet: admit the request later

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
        senders = self.cross_policy.senders_for(req.cache_variant) if self.cross_policy and allow_cross else None
        match = self.cache.match_prefix(req.cache_key[:req.max_prefix_len], req.cache_variant, senders)
        stored = self._stored_load(req, match)
        if stored is WAIT_FOR_MEMORY:
            return False
        if stored is not None:
            match = match._replace(cross=None)  # the load reaches further than the tree's cross hit
        prefix_len = match.length + (match.cross.length if match.cross else 0)
        if match.other_variants and self.cross_policy is not None and stored is None:
            self.cross_policy.note_missed(match.other_variants, req.cache_variant)
        loaded = stored[1].end - prefix_len if stored else 0
        extend = req.seq_len - prefix_len - loaded
        take = min(extend, self.rem_chunk, self.rem_tokens)
        if take < 1:
            return False  # this batch's token or chunk budget is spent
        chunked = take < extend
        if chunked and self.new_chunked_req is not None:
            return False  # one request is chunked at a time
        reserve = 0.0 if chunked else decode_reserve(req, self.ratio)
        if loaded + take + reserve > self.budget:
            if self.entries or not self.nothing_running:
                return False
            # Nothing else holds memory: make progress by chunking to fit.
            take, reserve, chunked = min(take, int(self.budget) - loaded), 0.0, True
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
        if (stored is not None and not self._bind_stored(req, *stored)) or not self._allocate(req, take):
            self.unbind(self.cache, req)
            self.cache.release_req(req)
            return False
        if stored is not None:
            req.store_prefetch = None
        if not req.admitted_once:
            req.cached_tokens, req.admitted_once = req.kv_len, True
            own_load = stored is not None and stored[0] == req.cache_variant
            req.cross_model_tokens = 0 if own_load else req.kv_len - match.length
            req.store_tokens = loaded
        if chunked:
            self.new_chunked_req = req
        self._commit(req, take, reserve)
        return True

    def _stored_load(self, req: Req, match):
        """(variant, StoreLoad, the group to recompute on a cross-model load, else
        None) of the request's KV-store prefetch if it continues
        the tree's match, further than the tree's own cross-model hit, and can be
        used; else None. A load that can never be used is cancelled; one that only
        has to wait for memory stays with the request."""
        future = req.store_prefetch
        if self.offloader is None or future is None:
            return None
        result = future.result()
        if result is not None:
            variant, load = result
            start = match.length
            reaches = match.cross.start + match.cross.length if match.cross is not None else start
            usable = load.start <= start < load.end and load.end > reaches
            choice = None
            if usable and variant != req.cache_variant:
                choice = self._cross_load_choice(req, variant, load, load.end - start)
                usable = choice is not None
            if usable:
                return (variant, load, choice) if load.end - start < self.budget else WAIT_FOR_MEMORY
            load.cancel()
        req.store_prefetch = None
        return None

    def _cross_load_choice(self, req: Req, sender: int, load, tokens: int):
        """The group the policy recomputes for a cross-model load, or None if the
        load cannot serve: it needs a profile for the pair and, for a group above
        layer 0, the sender's E cache at its start and rows to put it in."""
        policy = self.cross_policy
        if policy is None or sender not in policy.senders_for(req.cache_variant):
            return None
        choice = policy.choose(sender, req.cache_variant, self.idle, tokens)
        if choice.start == 0 or choice.start >= choice.end:
            return choice
        usable = (policy.e_index(choice.start) is not None and load.has_e
                  and self.cache.e_allocator.can_allocate(tokens))
        return choice if usable else None

    def _bind_stored(self, req: Req, variant: int, load, choice) -> bool:
        """Give the request fresh slots for the load's tokens [kv_len, load.end),
        which it owns like computed ones (a failed load drops them with it), and
        bind the load to them; on a cross-model load, queue the recompute of the
        receiver's group over them (from the sender's E cache above layer 0)."""
        start, end = req.kv_len, load.end
        n = end - start
        if not self._make_room(n):
            return False
        slots = self.allocator.allocate(n)
        self.req_pool.table[:, req.req_pool_idx, start:end] = slots.to(torch.int32)
        req.kv_len = end
        erows, temporary = None, False
        policy, e_alloc = self.cross_policy, self.cache.e_allocator
        if variant == req.cache_variant:
            if load.has_e and policy is not None and policy.is_sender(variant) and e_alloc.can_allocate(n):
                erows = e_alloc.allocate(n)  # its own E cache, kept with its KV
                req.erows.append(erows)
        else:
            if choice.start < choice.end and policy.e_index(choice.start) is not None:
                erows, temporary = e_alloc.allocate(n), True  # the sender's, for this forward only
            first = recompute_start(start, end, choice.tail)
            # the sink's loaded slots are the request's own, like the rest of the span
            self._queue_recompute(req, variant, choice, start, first, end, erows,
                                  sink_tokens(start, first, choice.start))
        req.store_load = self.offloader.bind(load, start, slots, erows, temporary)
        self.budget -= n
        return True

    @staticmethod
    def unbind(cache: PrefixCache, req: Req) -> None:
        """Drop the request's bound load (its slots stay with the request) and the
        E-cache rows it held for a recompute only."""
        load, req.store_load = req.store_load, None
        if load is not None and load.temporary_erows:
            cache.e_allocator.free(load.erows)
        req.recompute = None

    def _start_recompute(self, req: Req, match) -> bool:
        """Point the row at the sender's KV for the cross-model hit, with fresh
        slots for the recompute group's segments, and queue the recompute."""
        hit = match.cross
        choice = self.cross_policy.choose(hit.sender, req.cache_variant, self.idle, hit.length)
        spaces = self.cross_policy.segments.covering(choice.start, choice.end)
        end = hit.start + hit.length
        # Only the last `tail` share of the span is recomputed; before it the
        # sender's KV serves every layer.
        first = recompute_start(hit.start, end, choice.tail)
        sink = sink_tokens(hit.start, first, choice.start) if spaces else 0
        if spaces and not self._make_room(end - first + sink):
            return False
        table, row = self.req_pool.table, req.req_pool_idx
        table[:, row, hit.start:end] = hit.indices.to(torch.int32)
        # what the request owns: spaces over [first, end) and [0, sink)
        req.cross_start, req.cross_spaces, req.cross_sink = first, spaces, sink
        if spaces:
            for a, b in ((0, sink), (first, end)):
                if b > a:
                    table[spaces.start:spaces.stop, row, a:b] = self.allocator.allocate(b - a, spaces).to(torch.int32)
            self.budget -= end - first + sink
        self._queue_recompute(req, hit.sender, choice, hit.start, first, end, hit.erows, sink)
        return True

    def _queue_recompute(self, req: Req, sender: int, choice, start: int, first: int, end: int,
                         erows: torch.Tensor | None, sink: int = 0) -> None:
        """Queue the receiver's recompute of `choice`'s layer group over [first, end)
        of a cross-model hit [start, end) (nothing for an empty group), and over
        the sink tokens [0, sink), from the sender's E-cache rows `erows`
        [E, end - start] when the group starts above layer 0, and count the hit."""
        if choice.start < choice.end:
            e_index = self.cross_policy.e_index(choice.start)
            req.recompute = Recompute(req.req_pool_idx, first, end, choice.start, choice.end,
                                      None if e_index is None else erows[e_index, first - start:].clone(),
                                      torch.tensor(req.fill_ids[first:end], dtype=torch.int64),
                                      req.model_id, req.lora_id,
                                      torch.tensor(req.fill_ids[:sink], dtype=torch.int64) if sink else None)
        self.cross_policy.record_hit(sender, req.cache_variant, end - start, (choice.start, choice.end),
                                     end - first + sink, req.origin_input_ids, end, choice.tail)

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


def fuses_with_extend(job: Recompute | None, req: Req, num_layers: int) -> bool:
    """Whether a request's cross-model recompute can run as the head of its own
    extend: a group of every layer from the receiver's embeddings, over a span
    that ends where the extend begins, by the request's own model. The tokens
    then simply extend through all layers over the sender's KV before them, as
    one pass instead of two (the same attention, one set of per-layer calls)."""
    return (job is not None and job.layer_start == 0 and job.layer_end == num_layers
            and job.e_rows is None and job.end == req.kv_len and job.req_pool_idx == req.req_pool_idx
            and job.model_id == req.model_id and job.lora_id == req.lora_id)


def build_prefill_batch(entries: list[PrefillEntry], runner) -> tuple[ForwardBatch, torch.Tensor, list[list[int]]]:
    """ForwardBatch for the entries, plus the flat rows whose logits input-token
    logprobs need and, per entry, the positions those rows stand for. A
    recompute that `fuses_with_extend` becomes the first rows of its request's
    extend (listed in `batch.fused_recompute`, not `batch.recompute`)."""
    ids, positions, locs, extra_rows, extra_pos, e_locs = [], [], [], [], [], []
    separate, fused, firsts, lens = [], [], [], []
    sinks: list[Recompute] = []  # sink tokens of fused recomputes: KV-only requests after the others
    start = 0
    table = runner.req_to_token_pool.table
    num_layers = runner.model_config.num_layers
    for e in entries:
        r, n = e.req, e.num_tokens
        first = r.kv_len
        if fuses_with_extend(r.recompute, r, num_layers):
            fused.append(r.recompute)
            first = r.recompute.start
            if r.recompute.sink is not None:
                sinks.append(r.recompute.sink_job())
        elif r.recompute is not None:
            separate.append(r.recompute)
        end = r.kv_len + n
        ids.extend(r.fill_ids[first:end])
        positions.append(torch.arange(first, end))
        locs.append(table[:, r.req_pool_idx, first:end])
        e_loc = r.erows[-1] if r.erows else None
        if e_loc is not None and first < r.kv_len:  # no E cache kept for the recomputed rows
            e_loc = torch.cat([torch.zeros((e_loc.shape[0], r.kv_len - first), dtype=e_loc.dtype), e_loc], 1)
        e_locs.append(e_loc)
        pos_here = []
        if r.wants_input_logprobs:
            lo = max(r.kv_len, r.logprob_start_len - 1, 0)
            hi = min(end, len(r.origin_input_ids) - 1)
            pos_here = list(range(lo, hi))
            extra_rows.extend(start + p - first for p in pos_here)
        extra_pos.append(pos_here)
        firsts.append(first)
        lens.append(end - first)
        start += end - first
    for job in sinks:  # same layers from the embeddings, so the same pass: rows of their own
        ids.extend(job.input_ids.tolist())
        positions.append(torch.arange(job.start, job.end))
        locs.append(table[:, job.req_pool_idx, job.start:job.end])
        e_locs.append(None)
        firsts.append(job.start)
        lens.append(job.end - job.start)
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=torch.tensor(ids, dtype=torch.int64),
        positions=torch.cat(positions),
        out_cache_loc=torch.cat(locs, dim=1).to(torch.int64),
        req_pool_indices=torch.tensor([e.req.req_pool_idx for e in entries] + [j.req_pool_idx for j in sinks],
                                      dtype=torch.int64),
        seq_lens=torch.tensor([e.req.kv_len + e.num_tokens for e in entries] + [j.end for j in sinks],
                              dtype=torch.int64),
        prefix_lens=firsts,
        extend_lens=lens,
        kv_pool=runner.kv_pool,
        req_to_token=table,
        model_ids=[e.req.model_id for e in entries] + [j.model_id for j in sinks],
        lora_ids=[e.req.lora_id for e in entries] + [j.lora_id for j in sinks],
        recompute=separate,
        fused_recompute=fused,
        kv_only=len(sinks),
    )
    batch.e_pool, batch.e_loc = runner.e_pool, stack_e_loc(e_locs, lens)
    batch.loads = [e.req.store_load for e in entries if e.req.store_load is not None]
    return batch, torch.tensor(extra_rows, dtype=torch.int64), extra_pos


def stack_e_loc(e_locs: list[torch.Tensor | None], lens: list[int]) -> torch.Tensor | None:
    """[E, T] E-cache rows for a batch (0 where a request keeps none), or None."""
    present = [e for e in e_locs if e is not None]
    if not present:
        return None
    num_e = present[0].shape[0]
    return torch.cat([e if e is not None else torch.zeros((num_e, n), dtype=torch.int64)
                      for e, n in zip(e_locs, lens)], dim=1)
