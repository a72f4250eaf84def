"""Order of the waiting queue."""
from __future__ import annotations

from droidspeak.kvcache.base import PrefixCache
from droidspeak.scheduler.request import Req

# Past this queue length, lpm's per-request tree walks cost more than they save.
LPM_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: str, cache: PrefixCache) -> list[Req]:
    """lpm: longest cached prefix first (ties keep arrival order); fcfs: arrival order."""
    if policy == "fcfs" or len(waiting) > LPM_MAX_QUEUE:
        return list(waiting)
    matched = {id(r): int(cache.match_prefix(r.cache_key[:r.max_prefix_len]).indices.numel())
               for r in waiting}
    return sorted(waiting, key=lambda r: -matched[id(r)])
