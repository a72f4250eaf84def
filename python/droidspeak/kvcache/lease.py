"""A request's hold on KV memory: one owner for everything admission took.

A `KVLease` is opened at admission and closed exactly once, by `commit` (the
request finished: its KV goes to the prefix cache) or `release` (abort,
retraction, a failed load, a failed step: everything goes back). Nothing else
frees a request's slots, rows, locks or E-cache rows, so every path that ends a
request ends it the same way. `Leases` is the registry of open ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from droidspeak.kvcache.base import PrefixCache, rows_from
from droidspeak.kvcache.pool import ReqToTokenPool


@dataclass(eq=False)
class KVLease:
    """What one request holds, on its row `row` of the req-to-token table:

    - `node`, locked: the cache owns the row's slots [0, prefix_len), which stay
      valid while it is locked;
    - one reference to each slot [prefix_len, end) in every KV segment, of which
      [kv_len, end) are allocated for the forward under way;
    - after a cross-model hit, references to the recomputed segments
      `cross_spaces` over [cross_start, prefix_len) and over [0, cross_sink);
    - `erows`: E-cache rows for its tokens from prefix_len on (a sender's
      hidden states), one tensor [E, k] per allocation;
    - `load`: a KV-store load bound to some of its slots until the forward that
      reads it finishes (kvstore.offload.PoolLoad), with the E-cache rows that
      load holds for that forward only.
    """
    cache: PrefixCache
    req_pool: ReqToTokenPool
    variant: int                  # the cache variant its KV becomes
    row: int
    node: Any = None
    prefix_len: int = 0
    kv_len: int = 0
    end: int = 0
    cross_start: int = 0
    cross_spaces: range | None = None
    cross_sink: int = 0
    erows: list[torch.Tensor] = field(default_factory=list)
    step_erows: torch.Tensor | None = None  # E rows of the slots [kv_len, end), if any
    load: Any = None
    registry: "Leases | None" = None
    closed: bool = False

    # ---- growing --------------------------------------------------------------
    def point(self, start: int, slots: torch.Tensor, spaces: range | None = None) -> None:
        """Point the row's positions [start, start + n) (in `spaces`, default all
        segments) at `slots` without taking references: slots the lease holds by
        other means (the locked node's, or a cross-model sender's)."""
        table = self.req_pool.table if spaces is None else self.req_pool.table[spaces.start:spaces.stop]
        table[:, self.row, start:start + slots.shape[1]] = slots.to(torch.int32)

    def hold(self, slots: torch.Tensor, erows: torch.Tensor | None = None) -> None:
        """Take `slots` [G, n] (their references pass to the lease) as positions
        [end, end + n), with their E-cache rows [E, n] if the variant keeps them."""
        n = int(slots.shape[1])
        self.point(self.end, slots)
        self.end += n
        self.step_erows = erows
        if erows is not None:
            self.erows.append(erows)

    def grow(self, n: int, with_e: bool) -> None:
        """Allocate n more slots (and E-cache rows if `with_e`); the caller made room."""
        erows = self.cache.e_allocator.allocate(n) if with_e else None
        self.hold(self.cache.allocator.allocate(n), erows)

    def hold_cross(self, spaces: range, sink: int, first: int) -> None:
        """After a cross-model hit ending at prefix_len: fresh slots in `spaces`
        (the recomputed segments; the others keep pointing at the sender's) for
        the sink [0, sink) and for [first, prefix_len). The caller made room."""
        alloc = self.cache.allocator
        # Each span is owned from the moment its slots are in the row, no sooner.
        self.cross_spaces, self.cross_start = spaces, self.prefix_len
        if sink:
            self.point(0, alloc.allocate(sink, spaces), spaces)
            self.cross_sink = sink
        if first < self.prefix_len:
            self.point(first, alloc.allocate(self.prefix_len - first, spaces), spaces)
            self.cross_start = first

    def computed(self) -> None:
        """The forward under way wrote every held slot: [0, end) is KV now."""
        self.kv_len, self.step_erows = self.end, None

    def slots(self) -> torch.Tensor:
        """[G, kv_len] the slots of the computed tokens."""
        return self.req_pool.table[:, self.row, :self.kv_len].to(torch.int64)

    # ---- the store load ----------------------------------------------------------
    def bind(self, load) -> None:
        self.load = load

    def unbind(self) -> None:
        """Drop the bound load (its slots stay held) and the E-cache rows it held
        for its forward only."""
        load, self.load = self.load, None
        if load is not None and load.temporary_erows:
            self.cache.e_allocator.free(load.erows)

    # ---- closing -------------------------------------------------------------------
    def checkpoint(self, key: list[int]) -> None:
        """Insert the computed tokens (`key`, kv_len long) into the cache and point
        the row and the lock at the cache's copy (between prefill chunks, and at
        the end of a prompt's prefill)."""
        assert self.kv_len == self.end, "a checkpoint with slots still pending"
        if not self.cache.keeps_entries:
            return  # the lease keeps owning its slots
        self._insert(key)
        self._drop_owned()
        match = self.cache.match_prefix(key[:self.kv_len], self.variant)
        assert match.length == self.kv_len, (match.length, self.kv_len)
        self.point(0, match.indices)
        self.cache.lock(match.last_node)
        self.cache.unlock(self.node)
        self.prefix_len, self.node = self.kv_len, match.last_node

    def commit(self, key: list[int]) -> list:
        """The request finished: hand its KV (`key`, kv_len long) to the cache and
        close. Returns the futures of the store writes a write-through cache
        started for it."""
        self._check_open()
        self._truncate()
        node = self._insert(key)
        writes = self.cache._stored(self.variant, node)
        self._drop_owned()
        self._close()
        return writes

    def release(self) -> None:
        """Give back everything without caching it; cancels a bound load."""
        self._check_open()
        if self.load is not None:
            self.load.load.cancel()
            self.unbind()
        self.kv_len = self.end  # pending slots go back with the rest
        self._drop_owned()
        self._close()

    def _truncate(self) -> None:
        """Free the held slots past kv_len (a forward that did not run for them)."""
        if self.end > self.kv_len:
            table = self.req_pool.table
            self.cache.allocator.free(table[:, self.row, self.kv_len:self.end].to(torch.int64))
            self.end = self.kv_len

    def _insert(self, key: list[int]) -> Any:
        erows = None
        own = torch.cat(self.erows, dim=1) if self.erows else None
        # A variant that became a sender mid-request (an adapter loaded) has E rows
        # for only part of its tokens: keep none rather than a partial E cache.
        if own is not None and own.shape[1] == self.kv_len - self.prefix_len:
            erows = rows_from(own, self.prefix_len)
        return self.cache.insert(key[:self.kv_len], self.variant, self.slots(), erows)

    def _drop_owned(self) -> None:
        """Drop the lease's own references (the cache holds its copies now, or
        nobody needs them)."""
        table, row, alloc = self.req_pool.table, self.row, self.cache.allocator
        alloc.free(table[:, row, self.prefix_len:self.kv_len].to(torch.int64))
        if self.cross_spaces is not None:
            g = self.cross_spaces
            alloc.free(table[g.start:g.stop, row, self.cross_start:self.prefix_len].to(torch.int64), g)
            if self.cross_sink:
                alloc.free(table[g.start:g.stop, row, :self.cross_sink].to(torch.int64), g)
            self.cross_spaces, self.cross_sink = None, 0
        if self.erows:
            self.cache.e_allocator.free(torch.cat(self.erows, dim=1))
            self.erows = []

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("KV lease closed twice")

    def _close(self) -> None:
        self.cache.unlock(self.node)
        self.req_pool.free(self.row)
        self.closed = True
        self.node, self.prefix_len, self.kv_len, self.end = None, 0, 0, 0
        if self.registry is not None:
            self.registry.live.pop(self, None)


def grow_each(leases: list[KVLease], slots: torch.Tensor,
              erows: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One more slot for each lease, `slots[:, i]` for the i-th (with its E-cache
    row `erows[i]` [E, 1] or None): a decode step's, written to the table at once.
    Returns the leases' rows and the positions the slots took."""
    rows = torch.tensor([lease.row for lease in leases], dtype=torch.int64)
    ends = torch.tensor([lease.end for lease in leases], dtype=torch.int64)
    if leases:
        leases[0].req_pool.table[:, rows, ends] = slots.to(torch.int32)
    for lease, e in zip(leases, erows):
        lease.end += 1
        lease.step_erows = e
        if e is not None:
            lease.erows.append(e)
    return rows, ends


class Leases:
    """The open leases, each with the request that holds it."""

    def __init__(self, cache: PrefixCache, req_pool: ReqToTokenPool):
        self.cache, self.req_pool = cache, req_pool
        self.live: dict[KVLease, Any] = {}

    def open(self, owner: Any, variant: int) -> KVLease | None:
        """A new lease on a free request row, or None if every row is taken."""
        if not self.req_pool.can_allocate():
            return None
        lease = KVLease(self.cache, self.req_pool, variant, self.req_pool.allocate(), registry=self)
        self.live[lease] = owner
        return lease

    def owners(self) -> list:
        return list(self.live.values())

    def __len__(self) -> int:
        return len(self.live)
