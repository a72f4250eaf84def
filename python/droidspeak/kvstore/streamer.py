"""Adaptive streaming (CacheGen's controller): per chunk, the best compression
level whose fetch + decode fits the chunk's share of a TTFT target at the link's
estimated bandwidth, or recompute when even the smallest level would take longer
than prefilling the chunk's tokens.

Costs are measured, not assumed: the bandwidth of each tier from its recent
transfers (or a fixed override), decode time per byte per level from recent
decodes, and prefill time per token from the scheduler's recent prefills."""
from __future__ import annotations

from collections import deque

import numpy as np

# Quality order, best first (the lossless level is exact).
LEVEL_ORDER = ("lossless", "high", "medium", "low")
EWMA = 0.3
# Hysteresis of the load-or-recompute choice: a load starts only when it is
# estimated this much faster than recomputing, and once started it stops only when
# it is estimated this much slower. Near break-even the estimates are noisy, and
# flipping after a chunk or two pays for the transfers and the prefill both, which
# is slower than either alone.
STREAM_MARGIN = 0.15


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


class CostModel:
    """Measured costs. Prefill time is fitted to the engine's recent prefills as
    c + a * tokens + b * tokens * context, where context is the mean position the
    tokens attend over (a chunk deep in a long prompt costs more to recompute than
    one at its start) and c is the cost of a forward pass. The fit is non-negative
    least squares on relative error over recent observations kept per shape (token
    count and context, in powers of two), so a stream of short prefills neither
    drives a coefficient negative nor pushes out the long prefills that whole-prompt
    estimates rest on. The fit gives the cost's shape; the last RECENT
    prefills, of any shape, its current scale (`speed`: their measured over
    fitted time, the newest weighing most), so the estimate tracks a machine
    whose speed drifts (a shared VM's can move by a third within minutes) instead of
    averaging over the minutes the observations span. The recent prefills are in
    the fit too, so part of a drift seen on one shape goes into the fit's
    coefficients instead of the scale. Decode time per byte per level is a
    moving average."""

    PER_SHAPE = 16
    CONTEXT_SCALE = 1e-3  # keeps the regressors of similar size
    RECENT = 8            # prefills that set the current speed
    RECENT_DECAY = 0.7    # weight of each older one against the one after it
    SPEED_LIMITS = (1 / 3, 3.0)

    def __init__(self, forward_s: float = 0.02, prefill_s_per_token: float = 1e-3,
                 attention_s_per_token_position: float = 2e-7):
        self.prior = np.array([forward_s, prefill_s_per_token, attention_s_per_token_position / self.CONTEXT_SCALE])
        self._obs: dict[tuple[int, int], deque] = {}
        self._theta: np.ndarray | None = None
        self._recent: deque = deque(maxlen=self.RECENT)
        self._speed: float | None = None
        self.decode_s_per_byte = {"lossless": 2e-8, "high": 2e-8, "medium": 2e-8, "low": 2e-8}

    @property
    def measured_prefill(self) -> bool:
        return bool(self._obs)

    def observe_prefill(self, tokens: int, attended: float, seconds: float) -> None:
        """One prefill forward: `attended` is the sum over its tokens of the
        positions they attend over."""
        if tokens >= 1 and seconds > 0:
            shape = (int(tokens).bit_length(), int(attended / tokens).bit_length())
            row = (1.0, float(tokens), attended * self.CONTEXT_SCALE, seconds)
            self._obs.setdefault(shape, deque(maxlen=self.PER_SHAPE)).append(row)
            self._recent.append(row)
            self._theta = self._speed = None

    @property
    def theta(self) -> np.ndarray:
        if not self._obs:
            return self.prior
        if self._theta is None:
            self._theta = self._fit()
        return self._theta

    def _fit(self) -> np.ndarray:
        data = np.array([o for kept in self._obs.values() for o in kept])
        X, y = data[:, :3] / data[:, 3:], np.ones(len(data))  # relative error: each row divided by its time
        best, best_err = self.prior, np.inf
        for cols in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):  # every active set: exact NNLS in 3-D
            sol = np.linalg.lstsq(X[:, cols], y, rcond=None)[0]
            if (sol < 0).any():
                continue
            theta = np.zeros(3)
            theta[list(cols)] = sol
            err = float(np.sum((X @ theta - y) ** 2))
            if err < best_err - 1e-12:
                best, best_err = theta, err
        return best

    @property
    def speed(self) -> float:
        """Measured over fitted time of the recent prefills (geometric mean, the
        newest weighing most), within SPEED_LIMITS; 1.0 before any."""
        if not self._recent:
            return 1.0
        if self._speed is None:
            rows = np.array(self._recent)
            fitted = np.maximum(rows[:, :3] @ self.theta, 1e-9)
            weights = self.RECENT_DECAY ** np.arange(len(rows))[::-1]
            log_ratio = float(np.sum(weights * np.log(rows[:, 3] / fitted)) / np.sum(weights))
            self._speed = float(np.clip(np.exp(log_ratio), *self.SPEED_LIMITS))
        return self._speed

    def prefill_s(self, start: int, tokens: int) -> float:
        """Estimated time to prefill `tokens` tokens after a cached prefix of `start`."""
        c, a, b = self.theta
        return self.speed * float(c + tokens * (a + b * self.CONTEXT_SCALE * (start + tokens / 2)))

    def observe_decode(self, level: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.decode_s_per_byte[level] = _ewma(self.decode_s_per_byte.get(level), seconds / nbytes)


def choose_level(sizes: dict[str, int], bandwidth: float, latency_s: float, cost: CostModel,
                 budget_s: float | None, recompute_s: float, chunks_left: int = 1,
                 allow_recompute: bool = True, loading: bool = False) -> str | None:
    """The level to fetch the next chunk at, or None to stop loading and prefill
    the rest. `sizes`: bytes of each level the tier holds; `recompute_s`: estimated
    time to prefill the `chunks_left` chunks from this one on (once loading stops,
    the rest of the prompt is prefilled in one go); `budget_s`: the chunk's share of
    the TTFT target (None: no target, so the best level with which loading the rest
    still beats prefilling it). Without `allow_recompute`, a level is always
    chosen: the best that fits the budget, else the fastest. `loading`: earlier
    chunks of this prompt are already being loaded (see STREAM_MARGIN).

    A chunk's time is its link time plus its decode time when it is the last one;
    in a stream of `chunks_left` the loader keeps two fetches in flight, so one
    chunk's decode overlaps the next one's transfer and a chunk costs about the
    larger of the two, plus its share of filling the pipeline (summing them would
    overstate a slow link's cost)."""
    n_left = max(chunks_left, 1)
    times = {}
    for lv, n in sizes.items():
        link, dec = n / bandwidth, n * cost.decode_s_per_byte.get(lv, 2e-8)
        times[lv] = latency_s + max(link, dec) + min(link, dec) / n_left
    ordered = [lv for lv in LEVEL_ORDER if lv in times]
    per_chunk_recompute = recompute_s / n_left
    threshold = per_chunk_recompute * ((1 + STREAM_MARGIN) if loading else 1 / (1 + STREAM_MARGIN))
    if not ordered:
        return None
    if allow_recompute:
        limit = threshold if budget_s is None else min(budget_s, threshold)
    else:
        limit = float("inf") if budget_s is None else budget_s
    fitting = [lv for lv in ordered if times[lv] <= limit]
    level = fitting[0] if fitting else min(ordered, key=times.__getitem__)
    if allow_recompute and times[level] >= threshold:
        return None
    return level
