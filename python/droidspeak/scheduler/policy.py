"""Order of the waiting queue."""
from __future__ import annotations

from droidspeak.kvcache.base import PrefixCache
from droidspeak.scheduler.request import Req

# Past this queue length, lpm's per-request tree walks cost more than they save.
LPM_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: str, cache: PrefixCache,
                  last_admitted: dict[int, int] | None = None) -> list[Req]:
    """lpm: longest cached prefix first (ties keep arrival order); fcfs: arrival order.
    When several models (or adapters) wait, their queues are interleaved round-robin,
    the model admitted least recently (`last_admitted`: namespace -> step) first, so
    that one model's backlog cannot starve another."""
    if policy == "fcfs" or len(waiting) > LPM_MAX_QUEUE:
        ordered = list(waiting)
    else:
        matched = {id(r): cache.match_prefix(r.cache_key[:r.max_prefix_len], r.cache_variant).length
                   for r in waiting}
        ordered = sorted(waiting, key=lambda r: -matched[id(r)])
    return interleave_by_model(ordered, last_admitted or {})


def interleave_by_model(reqs: list[Req], last_admitted: dict[int, int]) -> list[Req]:
    queues: dict[int, list[Req]] = {}
    for r in reqs:
        queues.setdefault(r.cache_namespace, []).append(r)
    if len(queues) < 2:
        return reqs
    out = []
    lists = [queues[ns] for ns in sorted(queues, key=lambda ns: last_admitted.get(ns, -1))]
    for i in range(max(len(q) for q in lists)):
        out.extend(q[i] for q in lists if i < len(q))
    return out
