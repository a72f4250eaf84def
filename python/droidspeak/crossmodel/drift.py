"""The drift guard: cross-model profiles are measured once, on a calibration set;
live traffic may differ. When the engine is idle, the guard replays a sampled
recent cross-model hit both ways — with the recompute group the policy used, and
as the receiver's own full prefill — and compares the receiver's next-token
distributions over the prompt tokens after the reused span. A pair whose
observed quality loss stays above its budget is flagged; the guard then
re-scores the pair's frontier groups that the engine's KV layout can run on the
recent hits, switches to the smallest one within budget, or stops reusing for
the pair (full prefill) and says to re-profile it.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from droidspeak.crossmodel.quality import divergence
from droidspeak.scheduler.sequence import Sequence

logger = logging.getLogger(__name__)

MAX_TAIL_TOKENS = 64  # prompt tokens after the reused span that are compared


@dataclass
class HitSample:
    sender: int                  # variants
    receiver: int
    ids: list[int]               # the reused span followed by (part of) the rest of the prompt
    span: int
    group: tuple[int, int]
    sender_ids: tuple[int, int | None]    # (model_id, lora_id)
    receiver_ids: tuple[int, int | None]
    tail: float = 1.0                     # share of the span that was recomputed


@dataclass
class PairDrift:
    observed: deque = field(default_factory=lambda: deque(maxlen=4))  # relative soft-CE excess per check
    samples: deque = field(default_factory=lambda: deque(maxlen=8))
    flagged: bool = False


class DriftGuard:
    def __init__(self, policy, runner, interval_s: float = 30.0, sample_every: int = 4,
                 max_span: int = 1024, tolerance: float = 2.0):
        """`tolerance`: a pair is flagged when its mean observed excess over the last
        checks exceeds tolerance x max(its quality budget, its profiled excess)."""
        self.policy = policy
        self.runner = runner
        self.interval_s = interval_s
        self.sample_every = sample_every
        self.max_span = max_span
        self.tolerance = tolerance
        self.pending: deque[HitSample] = deque(maxlen=16)
        self.pairs: dict[tuple[int, int], PairDrift] = {}
        self.num_checks = 0
        self._hits = 0
        self._last_check = 0.0

    def record(self, sample: HitSample) -> None:
        """Called on every cross-model hit; keeps one in `sample_every` of those
        short enough to replay cheaply."""
        self._hits += 1
        if sample.span <= self.max_span and self._hits % self.sample_every == 1 % self.sample_every:
            self.pending.append(sample)

    def due(self) -> bool:
        return self.interval_s > 0 and bool(self.pending) and \
            time.monotonic() - self._last_check >= self.interval_s

    @torch.inference_mode()
    def check_one(self, make_room=None) -> float | None:
        """Replay the newest pending sample; returns its relative excess (None if
        there was nothing to check or no room). `make_room(n)` may evict cache
        entries to free n slots."""
        if not self.pending:
            return None
        sample = self.pending.pop()
        need = 3 * len(sample.ids)
        if make_room is not None and self.runner.allocator.available_size < need:
            make_room(need)
        if self.runner.allocator.available_size < need:
            return None
        self._last_check = time.monotonic()
        self.num_checks += 1
        excess = self.measure(sample, sample.group, sample.tail)
        pair = self.pairs.setdefault((sample.sender, sample.receiver), PairDrift())
        pair.observed.append(excess)
        pair.samples.append(sample)
        self._judge(sample, pair)
        return excess

    def measure(self, sample: HitSample, group: tuple[int, int], tail: float = 1.0) -> float:
        """Relative soft cross-entropy excess of reuse with `group` (over the last
        `tail` of the span) against the receiver's own prefill, on the tokens after
        the span."""
        reused = self._tail_logits(sample, group, tail)
        own = self._tail_logits(sample, None)
        return divergence(F.log_softmax(reused, -1), F.log_softmax(own, -1)).excess

    def _tail_logits(self, sample: HitSample, group, tail: float = 1.0) -> torch.Tensor:
        seqs = []
        try:
            receiver = Sequence(self.runner)
            seqs.append(receiver)
            if group is None:
                receiver.extend(sample.ids[:sample.span], *sample.receiver_ids)
            else:
                sender = Sequence(self.runner)
                seqs.append(sender)
                sender.extend(sample.ids[:sample.span], *sample.sender_ids, keep_e=group[0] > 0)
                receiver.reuse(sender, sample.span, group, *sample.receiver_ids, tail=tail)
            return receiver.extend(sample.ids[sample.span:], *sample.receiver_ids)
        finally:
            for seq in seqs:
                seq.release()

    def _judge(self, sample: HitSample, pair: PairDrift) -> None:
        choice = self.policy.choice_for(sample.sender, sample.receiver)
        if choice is None or len(pair.observed) < pair.observed.maxlen:
            return
        budget = self.tolerance * max(self.policy.quality, choice.profile.excess(choice.target))
        mean = sum(pair.observed) / len(pair.observed)
        if mean <= budget:
            return
        pair.flagged = True
        names = self.policy.names_of(sample.sender, sample.receiver)
        logger.warning("cross-model %s -> %s drifted: recent hits lose %.2f%% (budget %.2f%%) with layers "
                       "[%d, %d); re-scoring its frontier on %d recent hits", *names, 100 * mean, 100 * budget,
                       choice.target.start, choice.target.end, len(pair.samples))
        self._refresh(sample.sender, sample.receiver, pair)

    def _refresh(self, sender: int, receiver: int, pair: PairDrift) -> None:
        """Pick the smallest runnable frontier group within budget on recent hits."""
        choice = self.policy.choice_for(sender, receiver)
        names = self.policy.names_of(sender, receiver)
        for g in choice.profile.frontier:
            if g.cost <= choice.target.cost or not self.runner.supports_group(g.start, g.end):
                continue
            scores = [self.measure(s, (g.start, g.end), g.tail) for s in pair.samples]
            if sum(scores) / len(scores) <= self.policy.quality:
                self.policy.retarget(sender, receiver, g)
                pair.observed.clear()
                logger.warning("cross-model %s -> %s now recomputes layers [%d, %d)", *names, g.start, g.end)
                return
        self.policy.disable(sender, receiver)
        logger.warning("cross-model %s -> %s: no group this engine can run stays within budget; the pair "
                       "prefills in full until re-profiled (`droidspeak profile --sender %s --receiver %s "
                       "--overwrite`)", *names, *names)
