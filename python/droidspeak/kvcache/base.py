"""The prefix-cache interface the scheduler programs against.

Locking rule: the slot indices returned by `match_prefix` stay valid only while
the returned node is locked. The scheduler calls `lock(node)` before it uses them
and `unlock(node)` when the request releases them; `evict` never frees a slot
of a locked node or of any of its ancestors.
"""
from __future__ import annotations

import abc
from typing import Any, NamedTuple, Protocol

import torch

from droidspeak.kvcache.pool import ReqToTokenPool, SlotAllocator


class MatchResult(NamedTuple):
    indices: torch.Tensor  # [n] int64 pool slots of the matched prefix
    last_node: Any         # lock this to keep `indices` valid


class CachedRequest(Protocol):
    """What the cache needs to know about a request that holds KV."""
    req_pool_idx: int | None
    kv_len: int         # leading tokens of `cache_key` whose KV is in the request's row
    prefix_len: int     # leading tokens of the row owned by the cache (locked via last_node)
    last_node: Any

    @property
    def cache_key(self) -> list[int]:
        """The tokens whose KV the request holds, as prefix-cache keys."""


class PrefixCache(abc.ABC):
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: SlotAllocator):
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator

    @abc.abstractmethod
    def match_prefix(self, key: list[int]) -> MatchResult:
        """Longest cached prefix of `key`."""

    @abc.abstractmethod
    def insert(self, key: list[int], slots: torch.Tensor) -> int:
        """Cache `slots` as the KV of `key`; returns how many leading tokens were
        already cached (their slots in `slots` stay owned by the caller)."""

    @abc.abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots of unlocked entries, least recently
        used leaves first, if that many are evictable. Returns the number freed."""

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
        """Forget every entry (the caller resets the allocator)."""

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    # Request-level helpers built on the verbs above.
    def cache_finished_req(self, req: CachedRequest) -> None:
        """Hand a finished request's KV to the cache and release its row."""
        slots = self._row(req)
        already = self.insert(req.cache_key[:req.kv_len], slots.clone())
        # [prefix_len, already): computed by this request but cached meanwhile by another.
        self.allocator.free(slots[req.prefix_len:max(already, req.prefix_len)])
        self._free_row(req)

    def cache_unfinished_req(self, req: CachedRequest) -> None:
        """Insert what a still-running request has computed, and re-point its row
        and lock at the cache's copy (used between prefill chunks)."""
        slots = self._row(req)
        already = self.insert(req.cache_key[:req.kv_len], slots.clone())
        self.allocator.free(slots[req.prefix_len:max(already, req.prefix_len)])
        match = self.match_prefix(req.cache_key[:req.kv_len])
        n = int(match.indices.numel())
        assert n == req.kv_len, (n, req.kv_len)
        self.req_to_token_pool.table[req.req_pool_idx, :n] = match.indices.to(torch.int32)
        self.lock(match.last_node)
        self.unlock(req.last_node)
        req.prefix_len, req.last_node = n, match.last_node

    def release_req(self, req: CachedRequest) -> None:
        """Drop a request's KV without caching it (abort, retraction)."""
        if req.req_pool_idx is None:
            return
        self.allocator.free(self._row(req)[req.prefix_len:])
        self._free_row(req)

    def _row(self, req: CachedRequest) -> torch.Tensor:
        return self.req_to_token_pool.table[req.req_pool_idx, :req.kv_len].to(torch.int64)

    def _free_row(self, req: CachedRequest) -> None:
        self.unlock(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = None, None, 0, 0
