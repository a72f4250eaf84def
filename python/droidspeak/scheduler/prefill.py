"""Admission of waiting requests into a prefill batch: prefix matching, the token
budgets, chunking, and what each admitted request takes.

Admission is two steps. `PrefillAdder._plan` decides, from the request and the
cache state, what the request would reuse and compute (an `AdmissionPlan`);
`PrefillAdder._admit` carries the plan out on a new `KVLease`, which owns
everything it takes, so a plan that cannot be carried out releases its lease
and nothing else needs undoing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from droidspeak.kvcache.base import MatchResult, PrefixCache
from droidspeak.kvcache.lease import KVLease, Leases
from droidspeak.kvcache.pool import LayerSegments, SlotAllocator
from droidspeak.kvstore.offload import StoreLoad
from droidspeak.runner.batch import (ForwardBatch, ForwardMode, Recompute, recompute_start, sink_tokens,
                                     stack_e_loc)
from droidspeak.scheduler.request import Req

# Decode tokens reserved per running request are capped here: a request asking for
# 100K new tokens should not block admission of everything else.
CLIP_MAX_NEW_TOKENS = 4096


@dataclass
class PrefillEntry:
    req: Req
    num_tokens: int  # tokens of fill_ids computed by this forward, from req.kv_len on
    recompute: Recompute | None = None  # its cross-model recompute, run by this forward

    @property
    def completes_prompt(self) -> bool:
        return self.req.kv_len + self.num_tokens == self.req.seq_len


@dataclass
class CrossPlan:
    """Reuse of another variant's (`sender`'s) KV for tokens [start, end): the
    receiver recomputes layers [layer_start, layer_end) over [first, end) (the
    last `tail` share of the span) and over the attention sink [0, sink).
    `indices`/`erows`: the sender's slots and E-cache rows from the prefix tree
    (or a hand-driven Sequence); None for a load from the KV store."""
    sender: int
    start: int
    end: int
    layer_start: int
    layer_end: int
    tail: float
    first: int
    sink: int
    spaces: range                 # the KV segments of the group (empty: nothing recomputed)
    indices: torch.Tensor | None = None
    erows: torch.Tensor | None = None

    @property
    def recomputes(self) -> bool:
        return self.layer_start < self.layer_end

    @property
    def new_slots(self) -> int:
        """Slots a tree hit takes for the recomputed segments."""
        return self.end - self.first + self.sink if self.indices is not None and self.spaces else 0


@dataclass
class AdmissionPlan:
    """What admission decided for one request: its own cached prefix `match`
    [0, match.length); then either a cross-model hit from the tree (`cross` with
    indices) or a KV-store load `load` up to load.end (of its own KV, or of a
    sender's with `cross`); then `take` tokens computed by this forward, with
    `reserve` tokens of decode room set aside unless `chunked`."""
    match: MatchResult
    cross: CrossPlan | None
    load: StoreLoad | None
    take: int
    chunked: bool
    reserve: float

    @property
    def prefix_len(self) -> int:
        """Tokens served from the tree: the own prefix and a cross-model hit."""
        tree_cross = self.cross.end - self.cross.start if self.cross is not None and self.load is None else 0
        return self.match.length + tree_cross

    @property
    def loaded(self) -> int:
        return self.load.end - self.prefix_len if self.load is not None else 0

    @property
    def slots_needed(self) -> int:
        return self.loaded + self.take + (self.cross.new_slots if self.cross is not None else 0)


def plan_cross(sender: int, start: int, end: int, layers: tuple[int, int], tail: float,
               segments: LayerSegments, indices: torch.Tensor | None = None,
               erows: torch.Tensor | None = None) -> CrossPlan:
    """The cross-model reuse of the sender's KV over [start, end) with `layers`
    recomputed over the last `tail` share of the span (before it the sender's KV
    serves every layer) and the attention sink; `indices` given: a hit on the
    sender's slots, which the receiver keeps outside the group's segments."""
    first = recompute_start(start, end, tail)
    spaces = segments.covering(*layers) if indices is not None else range(0)
    sink = sink_tokens(start, first, layers[0]) if (spaces or indices is None) else 0
    return CrossPlan(sender, start, end, layers[0], layers[1], tail, first, sink, spaces, indices, erows)


def take_cross(lease: KVLease, cross: CrossPlan) -> None:
    """Point the lease's row at the sender's slots of a hit ending at its
    prefix_len, with fresh slots for the recomputed segments (the caller made
    room for `cross.new_slots`)."""
    lease.point(cross.start, cross.indices)
    if cross.spaces:
        lease.hold_cross(cross.spaces, cross.sink, cross.first)


def recompute_job(row: int, cross: CrossPlan, fill_ids: list[int], model_id: int, lora_id: int | None,
                  e_rows: torch.Tensor | None) -> Recompute | None:
    """The receiver's recompute of the plan's layers over [first, end) and the
    sink, from the sender's E-cache rows `e_rows` [end - start] at the group's
    first layer when it starts above layer 0 (None: nothing recomputed)."""
    if not cross.recomputes:
        return None
    first, sink = cross.first, cross.sink
    return Recompute(row, first, cross.end, cross.layer_start, cross.layer_end,
                     None if e_rows is None else e_rows[first - cross.start:].clone(),
                     torch.tensor(fill_ids[first:cross.end], dtype=torch.int64), model_id, lora_id,
                     torch.tensor(fill_ids[:sink], dtype=torch.int64) if sink else None)


def decode_reserve(req: Req, new_token_ratio: float) -> float:
    left = req.sampling_params.max_new_tokens - len(req.output_ids)
    return min(max(left, 0), CLIP_MAX_NEW_TOKENS) * new_token_ratio


class PrefillAdder:
    """Fills one prefill batch within the prefill token budget, the chunk size and
    the KV memory left after reserving decode room for running requests."""

    def __init__(self, cache: PrefixCache, allocator: SlotAllocator, leases: Leases,
                 max_prefill_tokens: int, chunk_size: int, memory_budget: float,
                 new_token_ratio: float, nothing_running: bool,
                 max_models: int = 1 << 30, active_models: set[int] | None = None,
                 cross_policy=None, idle: bool = False, offloader=None):
        self.cache, self.allocator, self.leases = cache, allocator, leases
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
        if take < 1 or not self._make_room(take):
            return False
        req.kv.grow(take, self._keeps_e(req))
        if take < req.extend_len:
            self.new_chunked_req = req
        self._commit(PrefillEntry(req, take), reserve)
        return True

    def add(self, req: Req) -> bool:
        """Admit a new (or retracted) request; False stops filling the batch."""
        if not self.leases.req_pool.can_allocate():
            return False
        plan = self._plan(req, allow_cross=True)
        if plan is None:
            return False
        admitted = self._admit(req, plan)
        if admitted is None and plan.cross is not None and plan.load is None:
            # The recomputed layers do not fit beside the sender's locked entry:
            # admit the request as a plain miss (evicting may then help).
            plan = self._plan(req, allow_cross=False)
            admitted = self._admit(req, plan) if plan is not None else None
        if admitted is None:
            return False
        lease, recompute = admitted
        req.kv = lease
        if plan.load is not None:
            req.store_prefetch = None
        if not req.admitted_once:
            req.cached_tokens, req.admitted_once = lease.kv_len, True
            own_load = plan.load is not None and plan.load.variant == req.cache_variant
            req.cross_model_tokens = 0 if own_load else lease.kv_len - plan.match.length
            req.store_tokens = plan.loaded
        if plan.cross is not None:
            c = plan.cross
            self.cross_policy.record_hit(c.sender, req.cache_variant, c.end - c.start,
                                         (c.layer_start, c.layer_end), c.end - c.first + c.sink,
                                         req.origin_input_ids, c.end, c.tail)
        if plan.chunked:
            self.new_chunked_req = req
        self.budget -= plan.slots_needed - plan.take  # _commit takes the extend and the reserve
        self._commit(PrefillEntry(req, plan.take, recompute), plan.reserve)
        return True

    # ---- deciding ----------------------------------------------------------------
    def _plan(self, req: Req, allow_cross: bool) -> AdmissionPlan | None:
        """What admitting `req` into this batch would take, or None if it cannot
        join this batch (a budget is spent, or its store load must wait for memory)."""
        senders = self.cross_policy.senders_for(req.cache_variant) if self.cross_policy and allow_cross else None
        match = self.cache.match_prefix(req.cache_key[:req.max_prefix_len], req.cache_variant, senders)
        load, wait = self._store_load(req, match)
        if wait:
            return None
        cross = None
        if load is not None and load.variant != req.cache_variant:
            cross = self._cross_plan(req, load.variant, match.length, load.end)
        elif load is None and match.cross is not None:
            hit = match.cross
            cross = self._cross_plan(req, hit.sender, hit.start, hit.start + hit.length, hit.indices, hit.erows)
        if match.other_variants and self.cross_policy is not None and load is None:
            self.cross_policy.note_missed(match.other_variants, req.cache_variant)
        plan = AdmissionPlan(match, cross, load, 0, False, 0.0)
        extend = req.seq_len - plan.prefix_len - plan.loaded
        take = min(extend, self.rem_chunk, self.rem_tokens)
        if take < 1:
            return None  # this batch's token or chunk budget is spent
        chunked = take < extend
        if chunked and self.new_chunked_req is not None:
            return None  # one request is chunked at a time
        reserve = 0.0 if chunked else decode_reserve(req, self.ratio)
        if plan.loaded + take + reserve > self.budget:
            if self.entries or not self.nothing_running:
                return None
            # Nothing else holds memory: make progress by chunking to fit.
            take, reserve, chunked = min(take, int(self.budget) - plan.loaded), 0.0, True
            if take < 1 or self.new_chunked_req is not None:
                return None
        plan.take, plan.chunked, plan.reserve = take, chunked, reserve
        return plan

    def _cross_plan(self, req: Req, sender: int, start: int, end: int,
                    indices: torch.Tensor | None = None, erows: torch.Tensor | None = None) -> CrossPlan:
        group = self.cross_policy.choose(sender, req.cache_variant, self.idle, end - start)
        return plan_cross(sender, start, end, (group.start, group.end), group.tail,
                          self.cross_policy.segments, indices, erows)

    def _store_load(self, req: Req, match) -> tuple[StoreLoad | None, bool]:
        """The request's KV-store prefetch if it continues the tree's match,
        further than the tree's own cross-model hit, and can be used, and whether
        the request must wait for memory to take it. A load that can never be
        used is cancelled; one that only has to wait stays with the request."""
        future = req.store_prefetch
        if self.offloader is None or future is None:
            return None, False
        load = future.result()
        if load is not None:
            start = match.length
            reaches = match.cross.start + match.cross.length if match.cross is not None else start
            usable = load.start <= start < load.end and load.end > reaches
            if usable and load.variant != req.cache_variant:
                usable = self._cross_load_usable(req, load, load.end - start)
            if usable:
                return (load, False) if load.end - start < self.budget else (None, True)
            load.cancel()
        req.store_prefetch = None
        return None, False

    def _cross_load_usable(self, req: Req, load: StoreLoad, tokens: int) -> bool:
        """Whether a sender's stored KV can serve: the pair needs a profile and,
        for a group above layer 0, the sender's E cache at its start and rows to
        put it in."""
        policy = self.cross_policy
        if policy is None or load.variant not in policy.senders_for(req.cache_variant):
            return False
        group = policy.choose(load.variant, req.cache_variant, self.idle, tokens)
        if group.start == 0 or group.start >= group.end:
            return True
        return (policy.e_index(group.start) is not None and load.has_e
                and self.cache.e_allocator.can_allocate(tokens))

    # ---- carrying out ------------------------------------------------------------
    def _admit(self, req: Req, plan: AdmissionPlan) -> tuple[KVLease, Recompute | None] | None:
        """Open a lease and take what the plan says; on any shortfall release it
        (which gives back whatever it took) and return None."""
        lease = self.leases.open(req, req.cache_variant)
        if lease is None:
            return None
        match = plan.match
        lease.node = match.last_node
        self.cache.lock(match.last_node)
        lease.point(0, match.indices)
        lease.prefix_len = lease.kv_len = lease.end = plan.prefix_len
        recompute = None
        cross = plan.cross
        if cross is not None and plan.load is None:  # a hit in the tree
            if cross.new_slots and not self._make_room(cross.new_slots):
                lease.release()
                return None
            take_cross(lease, cross)
            recompute = self._recompute_job(req, lease, cross, cross.erows)
        if plan.load is not None:
            if not self._make_room(plan.loaded):
                lease.release()
                return None
            recompute = self._bind_load(req, lease, plan.load, cross)
        if not self._make_room(plan.take):
            lease.release()
            return None
        lease.grow(plan.take, self._keeps_e(req))
        return lease, recompute

    def _bind_load(self, req: Req, lease: KVLease, load: StoreLoad, cross: CrossPlan | None) -> Recompute | None:
        """Hold fresh slots for the load's tokens [kv_len, load.end), which the
        lease owns like computed ones (a failed load releases them with it), and
        bind the load to them; on a sender's load, the recompute of the
        receiver's group over them (from the sender's E cache above layer 0)."""
        start, n = lease.end, load.end - lease.end
        slots = self.allocator.allocate(n)
        policy, e_alloc = self.cross_policy, self.cache.e_allocator
        kept = temporary = None
        if cross is None:
            if load.has_e and policy is not None and policy.is_sender(load.variant) and e_alloc.can_allocate(n):
                kept = e_alloc.allocate(n)  # its own E cache, kept with its KV
        elif cross.recomputes and policy.e_index(cross.layer_start) is not None:
            temporary = e_alloc.allocate(n)  # the sender's, for this forward only
        lease.hold(slots, kept)
        lease.kv_len = lease.end  # KV by the time the forward reads it
        erows = kept if kept is not None else temporary
        lease.bind(self.offloader.bind(load, start, slots, erows, temporary is not None))
        return self._recompute_job(req, lease, cross, temporary) if cross is not None else None

    def _recompute_job(self, req: Req, lease: KVLease, cross: CrossPlan,
                       erows: torch.Tensor | None) -> Recompute | None:
        """`recompute_job` for the request, from the sender's E-cache rows `erows`
        [E, end - start]."""
        e_index = self.cross_policy.e_index(cross.layer_start) if cross.recomputes else None
        return recompute_job(lease.row, cross, req.fill_ids, req.model_id, req.lora_id,
                             None if e_index is None else erows[e_index])

    def _keeps_e(self, req: Req) -> bool:
        return self.cross_policy is not None and self.cross_policy.is_sender(req.cache_variant)

    def _make_room(self, n: int) -> bool:
        short = n - self.allocator.available_size
        if short > 0:
            self.cache.evict(short)
        return self.allocator.can_allocate(n)

    def _commit(self, entry: PrefillEntry, reserve: float) -> None:
        self.entries.append(entry)
        self.active_models.add(entry.req.cache_namespace)
        self.budget -= entry.num_tokens + reserve
        self.rem_tokens -= entry.num_tokens
        self.rem_chunk -= entry.num_tokens


def fuses_with_extend(job: Recompute | None, req: Req, num_layers: int) -> bool:
    """Whether a request's cross-model recompute can run as the head of its own
    extend: a group of every layer from the receiver's embeddings, over a span
    that ends where the extend begins, by the request's own model. The tokens
    then simply extend through all layers over the sender's KV before them, as
    one pass instead of two (the same attention, one set of per-layer calls)."""
    return (job is not None and job.layer_start == 0 and job.layer_end == num_layers
            and job.e_rows is None and job.end == req.kv_len and job.req_pool_idx == req.kv.row
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
        r, n, job = e.req, e.num_tokens, e.recompute
        first = r.kv_len
        if fuses_with_extend(job, r, num_layers):
            fused.append(job)
            first = job.start
            if job.sink is not None:
                sinks.append(job.sink_job())
        elif job is not None:
            separate.append(job)
        end = r.kv_len + n
        ids.extend(r.fill_ids[first:end])
        positions.append(torch.arange(first, end))
        locs.append(table[:, r.kv.row, first:end])
        e_loc = r.kv.step_erows
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
        req_pool_indices=torch.tensor([e.req.kv.row for e in entries] + [j.req_pool_idx for j in sinks],
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
    batch.loads = [e.req.kv.load for e in entries if e.req.kv.load is not None]
    return batch, torch.tensor(extra_rows, dtype=torch.int64), extra_pos
