"""The prefix-cache interface the scheduler programs against.

The cache is keyed by token ids and shared by a whole model family (a lineage):
each entry belongs to one *variant* (a family member or LoRA adapter). A request's
own variant's entries are an exact hit; another variant's entries, with that
variant's E cache, can be a cross-model hit.

Locking rule: the slot indices returned by `match_prefix` (exact and cross) stay
valid only while the returned node is locked. The scheduler calls `lock(node)`
before it uses them and `unlock(node)` when the request releases them; `evict`
never frees a slot of a locked node or of any of its ancestors.

Ownership: slots are reference counted (`SlotAllocator`). An entry holds one
reference to each slot it stores; `insert` takes its own references, so callers
always drop theirs afterwards. A request holds references to the slots it computed:
[prefix_len, kv_len) in every segment, plus, after a cross-model hit, the
recomputed segments of [cross_start, prefix_len) and of [0, cross_sink).
"""
from __future__ import annotations

import abc
from typing import Any, NamedTuple, Protocol

import torch

from droidspeak.kvcache.pool import ReqToTokenPool, SlotAllocator


def rows_from(rows: torch.Tensor, start: int) -> torch.Tensor:
    """E-cache rows [E, start + n] of a key whose first `start` tokens keep none
    (row 0), then `rows` [E, n]."""
    out = torch.zeros((rows.shape[0], start + rows.shape[1]), dtype=torch.int64)
    out[:, start:] = rows
    return out


class CrossHit(NamedTuple):
    sender: int           # the variant whose entries were matched
    start: int            # first token position of the hit
    indices: torch.Tensor  # [G, m] the sender's slots for tokens [start, start + m)
    erows: torch.Tensor | None  # [E, m] the sender's E-cache rows (None: no E layer asked for)

    @property
    def length(self) -> int:
        return int(self.indices.shape[1])


class MatchResult(NamedTuple):
    indices: torch.Tensor  # [G, n] slots of the prefix the variant itself has cached
    last_node: Any         # lock this to keep `indices` (and the cross hit's) valid
    cross: CrossHit | None = None
    # Without a cross hit: other variants holding the next tokens (a hit a profile would allow).
    other_variants: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return int(self.indices.shape[1])


class CachedRequest(Protocol):
    """What the cache needs to know about a request that holds KV."""
    req_pool_idx: int | None
    kv_len: int         # leading tokens of `cache_key` whose KV is in the request's row
    prefix_len: int     # leading tokens of the row owned by the cache (locked via last_node)
    last_node: Any
    cache_variant: int  # the variant whose entries this request's KV becomes
    cross_start: int    # with cross_spaces: [cross_start, prefix_len) is a cross-model hit
    cross_spaces: range | None  # segments of the hit the request recomputed (and owns)
    erows: list[torch.Tensor]   # [E, k] E-cache rows it owns for tokens [prefix_len, kv_len)

    @property
    def cache_key(self) -> list[int]:
        """The tokens whose KV the request holds."""


class PrefixCache(abc.ABC):
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: SlotAllocator,
                 e_allocator: SlotAllocator | None = None):
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.e_allocator = e_allocator

    @property
    def num_e_layers(self) -> int:
        return self.e_allocator.num_spaces if self.e_allocator is not None else 0

    @abc.abstractmethod
    def match_prefix(self, key: list[int], variant: int = 0,
                     senders: dict[int, int | None] | None = None) -> MatchResult:
        """Longest prefix of `key` that `variant` has cached; then, if `senders`
        (sender variant -> index of the E-cache layer it must hold, None for none)
        is given, the longest continuation that one sender has cached with it."""

    @abc.abstractmethod
    def insert(self, key: list[int], variant: int, slots: torch.Tensor,
               erows: torch.Tensor | None = None) -> Any:
        """Cache `slots` ([G, len(key)]) and `erows` ([E, len(key)], 0 = none) as
        `variant`'s KV of `key`, taking a reference to what it keeps. Tokens the
        variant has cached already keep their old entries. Returns the node where
        `key` ends (None for a cache that keeps nothing)."""

    @abc.abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free unlocked entries, least recently used leaves first, until at least
        `num_tokens` slots were freed in every KV segment or nothing is evictable.
        Returns that number (a lower bound for each segment)."""

    @abc.abstractmethod
    def lock(self, node: Any) -> None: ...

    @abc.abstractmethod
    def unlock(self, node: Any) -> None: ...

    @property
    @abc.abstractmethod
    def evictable_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def protected_size(self) -> int: ...

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every entry (the caller resets the allocators)."""

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    # Request-level helpers built on the verbs above.
    def cache_finished_req(self, req: CachedRequest) -> None:
        """Hand a finished request's KV to the cache and release its row."""
        node = self._insert_req(req)
        self._stored(req, node)
        self._drop_owned(req)
        self._free_row(req)

    def _stored(self, req: CachedRequest, node: Any) -> None:
        """A finished request's KV is in the cache now, ending at `node` (a
        write-through cache copies it further down)."""

    def cache_unfinished_req(self, req: CachedRequest) -> None:
        """Insert what a still-running request has computed, and re-point its row
        and lock at the cache's copy (used between prefill chunks)."""
        self._insert_req(req)
        self._drop_owned(req)
        match = self.match_prefix(req.cache_key[:req.kv_len], req.cache_variant)
        assert match.length == req.kv_len, (match.length, req.kv_len)
        self.req_to_token_pool.table[:, req.req_pool_idx, :req.kv_len] = match.indices.to(torch.int32)
        self.lock(match.last_node)
        self.unlock(req.last_node)
        req.prefix_len, req.last_node = req.kv_len, match.last_node

    def release_req(self, req: CachedRequest) -> None:
        """Drop a request's KV without caching it (abort, retraction)."""
        if req.req_pool_idx is None:
            return
        self._drop_owned(req)
        self._free_row(req)

    def _insert_req(self, req: CachedRequest) -> Any:
        erows = None
        own = torch.cat(req.erows, dim=1) if req.erows else None
        # A variant that became a sender mid-request (an adapter loaded) has E rows
        # for only part of its tokens: keep none rather than a partial E cache.
        if own is not None and own.shape[1] == req.kv_len - req.prefix_len:
            erows = rows_from(own, req.prefix_len)
        return self.insert(req.cache_key[:req.kv_len], req.cache_variant, self._row(req), erows)

    def _drop_owned(self, req: CachedRequest) -> None:
        """Drop the request's own references (the cache holds its copies now, or
        nobody needs them)."""
        table = self.req_to_token_pool.table
        self.allocator.free(table[:, req.req_pool_idx, req.prefix_len:req.kv_len].to(torch.int64))
        if req.cross_spaces is not None:
            g = req.cross_spaces
            self.allocator.free(table[g.start:g.stop, req.req_pool_idx, req.cross_start:req.prefix_len]
                                .to(torch.int64), g)
            if req.cross_sink:
                self.allocator.free(table[g.start:g.stop, req.req_pool_idx, :req.cross_sink].to(torch.int64), g)
            req.cross_spaces, req.cross_sink = None, 0
        if req.erows:
            self.e_allocator.free(torch.cat(req.erows, dim=1))
            req.erows = []

    def _row(self, req: CachedRequest) -> torch.Tensor:
        return self.req_to_token_pool.table[:, req.req_pool_idx, :req.kv_len].to(torch.int64)

    def _free_row(self, req: CachedRequest) -> None:
        self.unlock(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = None, None, 0, 0
