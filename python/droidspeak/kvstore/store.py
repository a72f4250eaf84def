"""The tiered store: tiers fastest first, written through, read from the first
tier that holds a key (and promoted into faster tiers). A tier that fails is
taken out for `retry_s` with one log line and then tried again; while it is out
its reads are misses and its writes are dropped, so the engine recomputes."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from droidspeak.kvstore.tiers import Tier, TierError

logger = logging.getLogger(__name__)

# Bandwidth guesses (bytes/s) before a tier has been measured.
DEFAULT_BANDWIDTH = {"ram": 4e9, "disk": 1e9, "redis": 2e8}


@dataclass
class TierState:
    tier: Tier
    down_until: float = 0.0
    s_per_byte: float | None = None  # measured link time per byte (its inverse is the bandwidth)
    # Link throughput over overlapping reads: decayed sums of busy seconds and bytes,
    # and the end of the last read counted (see TieredStore._observe).
    busy_s: float = 0.0
    busy_bytes: float = 0.0
    busy_until: float = 0.0
    counters: dict = field(default_factory=lambda: {"hits": 0, "misses": 0, "errors": 0,
                                                    "bytes_read": 0, "bytes_written": 0})

    @property
    def name(self) -> str:
        return self.tier.name


class TieredStore:
    def __init__(self, tiers: list[Tier], retry_s: float = 5.0, bandwidth_override: float | None = None):
        self.states = [TierState(t) for t in tiers]
        self.retry_s = retry_s
        self.bandwidth_override = bandwidth_override
        self._lock = threading.Lock()

    @property
    def tiers(self) -> list[Tier]:
        return [s.tier for s in self.states]

    def _up(self) -> list[TierState]:
        now = time.monotonic()
        return [s for s in self.states if s.down_until <= now]

    def _fail(self, state: TierState, error: Exception) -> None:
        with self._lock:
            state.counters["errors"] += 1
            was_up = state.down_until <= time.monotonic()
            state.down_until = time.monotonic() + self.retry_s
        if was_up:
            logger.warning("KV store: %s tier failed (%s); recomputing instead, retrying it in %.0f s",
                           state.name, error, self.retry_s)

    def bandwidth(self, state: TierState) -> float:
        if self.bandwidth_override:
            return self.bandwidth_override
        if state.s_per_byte:
            return 1.0 / state.s_per_byte
        return DEFAULT_BANDWIDTH.get(state.name, 1e8)

    def locate(self, keys: list[str]) -> tuple[TierState, dict[str, int]] | None:
        """The first working tier holding any of `keys`, with the sizes it holds."""
        return self.locate_complete({k: [k] for k in keys})

    def locate_complete(self, groups: dict[str, list[str]]) -> tuple[TierState, dict[str, int]] | None:
        """The first working tier holding every key of at least one group (a chunk's
        layer parts at one level), with the total size of each complete group. One
        lookup per tier (one round trip on a network tier)."""
        for state in self._up():
            keys = [k for group in groups.values() for k in group]
            try:
                found = dict(zip(keys, state.tier.sizes(keys)))
            except TierError as e:
                self._fail(state, e)
                continue
            sizes = {name: sum(found[k] for k in group) for name, group in groups.items()
                     if all(found[k] is not None for k in group)}
            if sizes:
                return state, sizes
        return None

    def get(self, state: TierState, key: str) -> bytes | None:
        t0 = time.perf_counter()
        try:
            data = state.tier.get(key)
        except TierError as e:
            self._fail(state, e)
            return None
        t1 = time.perf_counter()
        if data is None:
            state.counters["misses"] += 1
            return None
        state.counters["hits"] += 1
        state.counters["bytes_read"] += len(data)
        if len(data) >= 64 << 10:
            self._observe(state, t0, t1, len(data))
        # Promote into the faster tiers so the next read is local.
        for faster in self.states[:self.states.index(state)]:
            self._put_one(faster, key, data)
        return data

    def _observe(self, state: TierState, t0: float, t1: float, nbytes: int) -> None:
        """Fold one read into the link's throughput: the time the link was busy
        (reads that overlap count their shared time once: two fetches in flight each
        see half the link, and the link is not half as fast) over the bytes moved,
        as decayed sums, so a burst of fast reads does not hide a slow link."""
        with self._lock:
            busy = t1 - max(t0, min(state.busy_until, t1))
            state.busy_until = max(state.busy_until, t1)
            state.busy_s = 0.7 * state.busy_s + busy
            state.busy_bytes = 0.7 * state.busy_bytes + nbytes
            if state.busy_s > 0:
                state.s_per_byte = state.busy_s / state.busy_bytes

    def has(self, key: str) -> bool:
        return self.locate([key]) is not None

    def put(self, key: str, data: bytes) -> None:
        for state in self._up():
            self._put_one(state, key, data)

    def _put_one(self, state: TierState, key: str, data: bytes) -> None:
        try:
            state.tier.put(key, data)
            state.counters["bytes_written"] += len(data)
        except TierError as e:
            self._fail(state, e)

    def discard(self, key: str) -> None:
        """Drop a key everywhere (a corrupt entry)."""
        for state in self._up():
            try:
                state.tier.delete(key)
            except TierError as e:
                self._fail(state, e)

    def stats(self) -> list[dict]:
        now = time.monotonic()
        return [{"tier": s.name, "up": s.down_until <= now, "bandwidth_bytes_per_s": self.bandwidth(s),
                 **s.counters, **s.tier.stats()} for s in self.states]

    def close(self) -> None:
        for s in self.states:
            s.tier.close()
