"""Adaptive streaming (CacheGen's controller): per chunk, the best compression
level whose fetch + decode fits the chunk's share of a TTFT target at the link's
estimated bandwidth, or recompute when even the smallest level would take longer
than prefilling the chunk's tokens.

Costs are measured, not assumed: the bandwidth of each tier from its recent
transfers (or a fixed override), decode time per byte per level from recent
decodes, and prefill time per token from the scheduler's recent prefills."""
from __future__ import annotations

from dataclasses import dataclass, field

# Quality order, best first (the lossless level is exact).
LEVEL_ORDER = ("lossless", "high", "medium", "low")
EWMA = 0.3


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


@dataclass
class CostModel:
    # Starting guesses until measurements come in (a 135M model on 2 cores, bf16).
    prefill_s_per_token: float = 1e-3
    decode_s_per_byte: dict[str, float] = field(default_factory=lambda: {
        "lossless": 4e-8, "high": 5e-8, "medium": 5e-8, "low": 6e-8})
    measured_prefill: bool = False

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= 32 and seconds > 0:
            self.prefill_s_per_token = _ewma(self.prefill_s_per_token if self.measured_prefill else None,
                                             seconds / tokens)
            self.measured_prefill = True

    def observe_decode(self, level: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.decode_s_per_byte[level] = _ewma(self.decode_s_per_byte.get(level), seconds / nbytes)


@dataclass(frozen=True)
class Choice:
    level: str | None     # None: recompute this chunk (and the rest of the prompt)
    est_load_s: float     # estimated fetch + decode of the chosen level
    est_recompute_s: float


def choose_level(sizes: dict[str, int], num_tokens: int, bandwidth: float, latency_s: float,
                 cost: CostModel, budget_s: float | None, allow_recompute: bool = True) -> Choice:
    """The level to fetch one chunk at. `sizes`: bytes of each level the tier
    holds; `budget_s`: the chunk's share of the TTFT target (None: no target, so
    the best level that still beats recomputing). Without `allow_recompute`, a
    level is always chosen: the best that fits the budget, else the fastest."""
    recompute = num_tokens * cost.prefill_s_per_token
    times = {lv: latency_s + n / bandwidth + n * cost.decode_s_per_byte.get(lv, 6e-8)
             for lv, n in sizes.items()}
    ordered = [lv for lv in LEVEL_ORDER if lv in times]
    if not ordered:
        return Choice(None, float("inf"), recompute)
    if allow_recompute:
        limit = recompute if budget_s is None else min(budget_s, recompute)
    else:
        limit = float("inf") if budget_s is None else budget_s
    fitting = [lv for lv in ordered if times[lv] <= limit]
    level = fitting[0] if fitting else min(ordered, key=times.__getitem__)
    if allow_recompute and times[level] >= recompute:
        return Choice(None, times[level], recompute)
    return Choice(level, times[level], recompute)
