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
always drop theirs afterwards. A request holds its references through its lease
(kvcache.lease.KVLease), which says which.
"""
from __future__ import annotations

import abc
from typing import Any, NamedTuple

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


class PrefixCache(abc.ABC):
    keeps_entries = True  # False: `insert` keeps nothing and a request owns all its slots

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

    def _stored(self, variant: int, node: Any) -> list:
        """`variant`'s KV ending at `node` is in the cache now (a finished
        request's); a write-through cache copies it further down and returns the
        futures of those writes."""
        return []
