"""Profile files: what the profiler measured for one (sender, receiver) pair.

The quality metric is the receiver's *soft cross-entropy* against its own full
prefill: the mean over positions of -sum_v p_full(v) log p_reuse(v), which is the
entropy of the full-prefill distribution plus KL(p_full || p_reuse). It equals the
full prefill's value exactly when reuse changes nothing and grows with any
divergence, on any text, so "within 1% of full prefill" means KL at most 1% of
the receiver's own predictive entropy. Cross-entropy of the real text and task
accuracy are kept alongside (they also move with domain, not only with reuse).

A profile is JSON written by `droidspeak profile` and read back by every engine
start, so reading validates every field (a profile may come from another machine
or an older version) and a bad one is refused with a message naming the field.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

FORMAT = "droidspeak-profile"
VERSION = 1
# A group meets a quality target when its mean excess plus this many standard
# errors (over the calibration contexts) is within it: the profile is a small
# sample, and held-out contexts land on either side of its mean.
CONFIDENCE_Z = 1.0


class ProfileError(ValueError):
    """A profile file that cannot be used."""


@dataclass(frozen=True)
class GroupScore:
    """Quality of the receiver when it recomputes layers [start, end) over the
    sender's KV (start == end: wholesale reuse), on the calibration set."""
    start: int
    end: int
    soft_ce: float            # the metric: soft cross-entropy against the full prefill (nats)
    ce: float                 # receiver's cross-entropy on the real text of the suffix (nats/token)
    kl: float                 # KL(own full prefill || this) of next-token distributions
    agreement: float          # greedy-token agreement with its own full prefill
    task: float | None = None  # share of calibration answers still produced greedily
    tail: float = 1.0         # share of the reused span recomputed, counted from its end
    soft_ce_items: tuple[float, ...] = ()  # the metric per calibration context (its spread)

    @property
    def layers(self) -> int:
        return self.end - self.start

    @property
    def cost(self) -> float:
        """Recompute work in layers' worth of the span (layers x tail)."""
        return self.layers * self.tail


@dataclass
class Profile:
    sender: str
    receiver: str
    num_layers: int
    step: int
    full: GroupScore                # the receiver's own full prefill (the reference)
    groups: list[GroupScore]        # every swept group, wholesale reuse (start == end) included
    sender_fingerprint: str = ""
    receiver_fingerprint: str = ""
    calibration: dict = field(default_factory=dict)

    @property
    def frontier(self) -> list[GroupScore]:
        """Pareto frontier: least recompute work (layers x tail) for each level of
        quality (soft cross-entropy), from wholesale reuse up."""
        best, out = math.inf, []
        for g in sorted(self.groups, key=lambda g: (g.cost, g.soft_ce)):
            if g.soft_ce < best:
                out.append(g)
                best = g.soft_ce
        return out

    def excess(self, g: GroupScore) -> float:
        """Relative extra soft cross-entropy over the full prefill (0.01 = 1%)."""
        return g.soft_ce / self.full.soft_ce - 1 if self.full.soft_ce > 0 else math.inf

    def excess_se(self, g: GroupScore) -> float:
        """Standard error of the excess over the calibration contexts (0 when the
        profile has no per-context values)."""
        full = self.full.soft_ce_items
        if len(g.soft_ce_items) < 2 or len(full) != len(g.soft_ce_items) or min(full) <= 0:
            return 0.0
        per = [a / b - 1 for a, b in zip(g.soft_ce_items, full)]
        mean = sum(per) / len(per)
        var = sum((x - mean) ** 2 for x in per) / (len(per) - 1)
        return math.sqrt(var / len(per))

    def meets(self, g: GroupScore, quality: float) -> bool:
        """Within `quality` (relative) of the receiver's full prefill, with
        CONFIDENCE_Z standard errors of margin."""
        return self.excess(g) + CONFIDENCE_Z * self.excess_se(g) <= quality

    def smallest_meeting(self, quality: float) -> GroupScore | None:
        return next((g for g in self.frontier if self.meets(g, quality)), None)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "sender": self.sender, "receiver": self.receiver,
                "sender_fingerprint": self.sender_fingerprint,
                "receiver_fingerprint": self.receiver_fingerprint,
                "num_layers": self.num_layers, "step": self.step, "calibration": self.calibration,
                "metric": "soft_cross_entropy", "full_prefill": asdict(self.full),
                "groups": [asdict(g) for g in self.groups],
                "frontier": [[g.start, g.end, g.tail] for g in self.frontier]}

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, data) -> "Profile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"not a droidspeak profile (format must be {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ProfileError(f"profile version {data.get('version')!r} is not {VERSION}")
        num_layers = _int(data, "num_layers", 1)
        step = _int(data, "step", 1)
        groups = data.get("groups")
        if not isinstance(groups, list) or not groups:
            raise ProfileError("groups must be a non-empty list")
        for key in ("sender", "receiver", "sender_fingerprint", "receiver_fingerprint"):
            if not isinstance(data.get(key, ""), str):
                raise ProfileError(f"{key} must be a string")
        calibration = data.get("calibration", {})
        if not isinstance(calibration, dict):
            raise ProfileError("calibration must be an object")
        return cls(data["sender"], data["receiver"], num_layers, step,
                   _score(data.get("full_prefill"), num_layers, "full_prefill"),
                   [_score(g, num_layers, f"groups[{i}]") for i, g in enumerate(groups)],
                   data.get("sender_fingerprint", ""), data.get("receiver_fingerprint", ""), calibration)

    @classmethod
    def load(cls, path: str) -> "Profile":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProfileError(f"{path}: cannot read: {e}") from None
        try:
            return cls.from_json(data)
        except ProfileError as e:
            raise ProfileError(f"{path}: {e}") from None


def _int(data: dict, key: str, low: int) -> int:
    v = data.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ProfileError(f"{key} must be an integer >= {low}, got {v!r}")
    return v


def _score(d, num_layers: int, where: str) -> GroupScore:
    if not isinstance(d, dict):
        raise ProfileError(f"{where} must be an object")
    start, end = d.get("start"), d.get("end")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)) \
            or not 0 <= start <= end <= num_layers:
        raise ProfileError(f"{where}: start/end must be integers with 0 <= start <= end <= {num_layers}")
    values = {}
    for key in ("soft_ce", "ce", "kl", "agreement"):
        v = d.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ProfileError(f"{where}.{key} must be a finite number >= 0, got {v!r}")
        values[key] = float(v)
    task = d.get("task")
    if task is not None and (not isinstance(task, (int, float)) or not 0 <= task <= 1):
        raise ProfileError(f"{where}.task must be null or in [0, 1], got {task!r}")
    tail = d.get("tail", 1.0)
    if not isinstance(tail, (int, float)) or isinstance(tail, bool) or not 0 < tail <= 1:
        raise ProfileError(f"{where}.tail must be in (0, 1], got {tail!r}")
    items = d.get("soft_ce_items", [])
    if not isinstance(items, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in items):
        raise ProfileError(f"{where}.soft_ce_items must be a list of finite numbers >= 0")
    return GroupScore(start, end, values["soft_ce"], values["ce"], values["kl"], values["agreement"],
                      None if task is None else float(task), float(tail), tuple(float(v) for v in items))


def default_profile_dir(root_name: str) -> str:
    from droidspeak.models.default_model import cache_dir
    return os.path.join(cache_dir(), "profiles", root_name)


def profile_path(directory: str, sender: str, receiver: str) -> str:
    return os.path.join(directory, f"{sender}__{receiver}.json")
