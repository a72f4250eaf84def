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
    that one model's backlog cannot starve another. Within a model, claimants
    (`Req.group`: API calls, or clients) are interleaved the same way in order of
    arrival, so a small call behind a large batch is not served after all of it."""
    if policy == "fcfs" or len(waiting) > LPM_MAX_QUEUE:
        ordered = list(waiting)
    else:
        matched = {id(r): cache.match_prefix(r.cache_key[:r.max_prefix_len], r.cache_variant).length
                   for r in waiting}
        ordered = sorted(waiting, key=lambda r: -matched[id(r)])
    by_call = round_robin(ordered, lambda r: r.group, lambda group: 0)
    last_admitted = last_admitted or {}
    return round_robin(by_call, lambda r: r.cache_namespace, lambda ns: last_admitted.get(ns, -1))


def round_robin(reqs: list[Req], key, rank) -> list[Req]:
    """`reqs` split by `key` into queues (each keeping its order), then taken one
    from each queue per round, queues ordered by `rank` (ties: first seen first)."""
    queues: dict = {}
    for r in reqs:
        queues.setdefault(key(r), []).append(r)
    if len(queues) < 2:
        return reqs
    out = []
    lists = [queues[k] for k in sorted(queues, key=rank)]
    for i in range(max(len(q) for q in lists)):
        out.extend(q[i] for q in lists if i < len(q))
    return out
