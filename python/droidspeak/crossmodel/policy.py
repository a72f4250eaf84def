"""The runtime policy: for each request of a receiver whose prompt another family
member (the sender) has cached, pick the recompute group from the pair's profile.

Per pair it keeps two points of the profile's frontier: the *target*, the fewest
recomputed layers within `quality` of the receiver's full prefill, and the *idle*
point, the best group with the same start (so the same E cache), used when
nothing else is queued and recomputing more costs no one latency. A pair without
a usable profile is never reused: its requests prefill in full, and the log says
how to profile it. The idle point is used only with a TTFT budget
(`idle_ttft_ms`) that its estimated recompute time fits, from the measured cost
of a token-layer of prefill.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from droidspeak.crossmodel.profile import GroupScore, Profile, ProfileError, profile_path
from droidspeak.kvcache.pool import KVLayout, LayerSegments

logger = logging.getLogger(__name__)


@dataclass
class PairChoice:
    target: GroupScore
    idle: GroupScore
    profile: Profile


@dataclass
class PairStats:
    hits: int = 0
    tokens: int = 0             # prompt tokens reused from the sender
    layers_recomputed: int = 0  # summed over hits
    token_layers_recomputed: int = 0  # recomputed (token, layer) pairs, sink included


class CrossModelPolicy:
    def __init__(self, profiles: list[Profile], quality: float, num_layers: int,
                 idle_ttft_ms: float | None = None, statuses: dict[tuple[str, str], str] | None = None):
        """`statuses`: why each pair without a usable profile prefills in full."""
        self.quality = quality
        self.idle_ttft_ms = idle_ttft_ms
        self.seconds_per_token_layer: float | None = None  # measured prefill cost (EMA)
        self.num_layers = num_layers
        self.choices, self.statuses = self._choose(profiles, None, dict(statuses or {}))
        bounds = sorted({b for c in self.choices.values() for b in (c.target.start, c.target.end, c.idle.end)})
        e_layers = sorted({c.target.start for c in self.choices.values() if c.target.start > 0})
        self.segments = LayerSegments(num_layers, bounds)
        self.layout = KVLayout(tuple(bounds), tuple(e_layers))
        self.stats: dict[tuple[str, str], PairStats] = {}
        self._names: dict[int, str] = {}
        self._variants: dict[str, int] = {}
        self._pairs: dict[tuple[int, int], PairChoice] = {}
        self._senders: dict[int, dict[int, int | None]] = {}
        self._e_senders: set[int] = set()
        self._missed_logged: set[tuple[int, int]] = set()
        self._remote: set[str] = set()  # members served elsewhere: their stored KV is reused here
        # Called as hit_listener(sender, receiver, prompt_ids, span_end, group, tail) on each hit.
        self.hit_listener = None

    def _choose(self, profiles: list[Profile], supports, statuses: dict
                ) -> tuple[dict[tuple[str, str], PairChoice], dict[tuple[str, str], str]]:
        """Each profile's target and idle groups. With `supports(start, end)` (the KV
        pool exists and cannot change while serving) only groups it can run are
        candidates; without, the layout is made from the choices."""
        choices = {}
        for p in profiles:
            pair = (p.sender, p.receiver)
            if p.num_layers != self.num_layers:
                statuses[pair] = f"profile is for {p.num_layers} layers, the model has {self.num_layers}"
                logger.warning("profile %s -> %s: %s; ignored", *pair, statuses[pair])
                continue
            fits = (lambda g: True) if supports is None else (lambda g: supports(g.start, g.end))
            target = p.smallest_meeting(self.quality) if supports is None else min(
                (g for g in p.groups if fits(g) and p.meets(g, self.quality)),
                key=lambda g: (g.cost, g.soft_ce), default=None)
            if target is None or (target.start == 0 and target.end == self.num_layers and target.tail == 1):
                best = p.smallest_meeting(self.quality)
                if supports is not None and best is not None and best.cost < self.num_layers:
                    statuses[pair] = (f"profiled: recompute layers [{best.start}, {best.end}) needs a KV layout "
                                      "the running engine lacks; restart it to use this pair")
                else:
                    statuses[pair] = (f"no group is within {100 * self.quality:.1f}% of full prefill short of "
                                      "recomputing every layer")
                logger.warning("profile %s -> %s: %s; that pair prefills in full", *pair, statuses[pair])
                continue
            same_start = [g for g in p.groups if g.start == target.start and g.end >= target.end
                          and g.tail >= target.tail and fits(g)]
            idle = min(same_start, key=lambda g: (g.soft_ce, g.cost))
            choices[pair] = PairChoice(target, idle, p)
            logger.info("cross-model %s -> %s: recompute layers [%d, %d) over the last %.0f%% of the reused "
                        "span (idle: [%d, %d), %.0f%%), %.2f%% (+-%.2f%%) over full prefill's soft cross-entropy",
                        p.sender, p.receiver, target.start, target.end, 100 * target.tail, idle.start, idle.end,
                        100 * idle.tail, 100 * p.excess(target), 100 * p.excess_se(target))
        return choices, statuses

    @classmethod
    def from_directory(cls, directory: str | None, fingerprints: dict[str, str], quality: float,
                       num_layers: int, idle_ttft_ms: float | None = None) -> "CrossModelPolicy":
        """Profiles for every ordered pair of the members `fingerprints` names
        (name -> the fingerprint of its weights, which each profile must match)
        found in `directory`."""
        profiles, statuses = read_profiles(directory, fingerprints)
        return cls(profiles, quality, num_layers, idle_ttft_ms, statuses)

    def reload(self, directory: str | None, fingerprints: dict[str, str], layout: KVLayout,
               supports) -> None:
        """Read the profiles again while serving (new members, new or re-made
        profiles); the running pool's KV `layout` stays, so each pair's group must be
        one it `supports(start, end)`. Counters are kept; a drift guard's
        retargeting is replaced by the profile's."""
        profiles, statuses = read_profiles(directory, fingerprints)
        self.layout, self.segments = layout, LayerSegments(self.num_layers, layout.segment_bounds)
        self.choices, self.statuses = self._choose(profiles, supports, statuses)
        self.bind(self._variants)

    def bind(self, variants: dict[str, int], remote: tuple[str, ...] | None = None) -> None:
        """Map model names to prefix-cache variants (call again when adapters
        change); `remote` of them are hosted elsewhere: senders only."""
        self._variants = dict(variants)
        if remote is not None:
            self._remote = set(remote)
        self._names = {v: n for n, v in variants.items()}
        self._pairs = {(variants[s], variants[r]): c for (s, r), c in self.choices.items()
                       if s in variants and r in variants and r not in self._remote}
        self._reindex()

    def _reindex(self) -> None:
        """Derive the per-request lookups from `_pairs` (after any change to it)."""
        self._senders = {}
        for (s, r), c in self._pairs.items():
            self._senders.setdefault(r, {})[s] = self.e_index(c.target.start)
        self._e_senders = {s for (s, _), c in self._pairs.items() if c.target.start > 0}

    # ---- what the drift guard asks and changes ------------------------------------
    def choice_for(self, sender: int, receiver: int) -> PairChoice | None:
        return self._pairs.get((sender, receiver))

    def names_of(self, *variants: int) -> tuple[str, ...]:
        return tuple(self._names.get(v, str(v)) for v in variants)

    def retarget(self, sender: int, receiver: int, group: GroupScore) -> None:
        c = self._pairs[(sender, receiver)]
        c.target = group
        if c.idle.cost < group.cost or c.idle.start != group.start:
            c.idle = group
        self._reindex()

    def disable(self, sender: int, receiver: int) -> None:
        self._pairs.pop((sender, receiver), None)
        names = self.names_of(sender, receiver)
        self.choices.pop(names, None)
        self.statuses[names] = "stopped by the drift guard: no group it can run stays within the target; re-profile"
        self._reindex()

    def describe(self) -> list[dict]:
        """Every ordered pair of the bound members: a profiled one with its groups
        and counters, any other with why it prefills in full (for /server_info)."""
        out = []
        for s in self._variants:
            for r in self._variants:
                if s == r or r in self._remote:
                    continue
                c = self.choices.get((s, r))
                if c is None:
                    out.append({"sender": s, "receiver": r, "status": self.statuses.get((s, r), "missing"),
                                "command": f"droidspeak profile --sender {s} --receiver {r}"})
                    continue
                st = self.stats.get((s, r), PairStats())
                out.append({"sender": s, "receiver": r, "status": "profiled",
                            "recompute_layers": [c.target.start, c.target.end],
                            "recompute_tail": c.target.tail, "idle_recompute_layers": [c.idle.start, c.idle.end],
                            "idle_recompute_tail": c.idle.tail, "hits": st.hits,
                            "reused_tokens": st.tokens, "recomputed_layers": st.layers_recomputed,
                            "recomputed_token_layers": st.token_layers_recomputed})
        return out

    # ---- what the scheduler asks ---------------------------------------------
    def senders_for(self, receiver: int) -> dict[int, int | None]:
        """Senders whose KV `receiver` may reuse -> the E-cache index it needs (None: none)."""
        return self._senders.get(receiver, {})

    def is_sender(self, variant: int) -> bool:
        """Whether `variant` keeps an E cache (a sender of a group starting above layer 0)."""
        return variant in self._e_senders

    def choose(self, sender: int, receiver: int, idle: bool, tokens: int) -> GroupScore:
        """The group (and tail share) to recompute for a hit of `tokens` tokens."""
        c = self._pairs[(sender, receiver)]
        g = c.target
        if idle and c.idle is not c.target and self.idle_ttft_ms is not None \
                and self.seconds_per_token_layer is not None \
                and tokens * c.idle.cost * self.seconds_per_token_layer * 1000 <= self.idle_ttft_ms:
            g = c.idle
        return g

    def group(self, sender: int, receiver: int, idle: bool, tokens: int) -> tuple[int, int]:
        g = self.choose(sender, receiver, idle, tokens)
        return g.start, g.end

    def observe_prefill(self, seconds: float, token_layers: int) -> None:
        """Feed the cost of one prefill forward (tokens times layers it ran)."""
        if token_layers > 0:
            rate = seconds / token_layers
            prev = self.seconds_per_token_layer
            self.seconds_per_token_layer = rate if prev is None else 0.8 * prev + 0.2 * rate

    def e_index(self, layer: int) -> int | None:
        return self.layout.e_layers.index(layer) if layer > 0 else None

    def record_hit(self, sender: int, receiver: int, tokens: int, group: tuple[int, int],
                   recomputed_tokens: int, prompt_ids: list[int] | None = None, span_end: int = 0,
                   tail: float = 1.0) -> None:
        """Count a cross-model hit of `tokens` reused tokens whose group recomputes
        `recomputed_tokens` tokens (its tail and attention sink)."""
        key = (self._names.get(sender, str(sender)), self._names.get(receiver, str(receiver)))
        st = self.stats.setdefault(key, PairStats())
        st.hits += 1
        st.tokens += tokens
        st.layers_recomputed += group[1] - group[0]
        st.token_layers_recomputed += recomputed_tokens * (group[1] - group[0])
        if self.hit_listener is not None and prompt_ids is not None:
            self.hit_listener(sender, receiver, prompt_ids, span_end, group, tail)

    def note_missed(self, senders: tuple[int, ...], receiver: int) -> None:
        """Another member cached this prompt, but the pair has no profile: say so once."""
        for s in senders:
            if (s, receiver) in self._missed_logged or s not in self._names or receiver not in self._names:
                continue
            self._missed_logged.add((s, receiver))
            logger.info("model %s's prompt continues a prefix that %s has cached, but the pair has no "
                        "usable cross-model profile, so it prefills in full; profile it with "
                        "`droidspeak profile --sender %s --receiver %s`", self._names[receiver],
                        self._names[s], self._names[s], self._names[receiver])


def read_profiles(directory: str | None, fingerprints: dict[str, str]
                  ) -> tuple[list[Profile], dict[tuple[str, str], str]]:
    """The usable profiles of every ordered pair of the members `fingerprints`
    names in `directory`, and for each pair without one, why ("missing", stale,
    invalid)."""
    profiles, statuses = [], {}
    for sender in fingerprints:
        for receiver in fingerprints:
            path = profile_path(directory, sender, receiver) if directory else None
            if sender == receiver:
                continue
            if path is None or not os.path.isfile(path):
                statuses[(sender, receiver)] = "missing"
                continue
            try:
                p = Profile.load(path)
            except ProfileError as e:
                logger.warning("%s; that pair prefills in full", e)
                statuses[(sender, receiver)] = f"invalid: {e}"
                continue
            stale = [n for n, fp in ((sender, p.sender_fingerprint), (receiver, p.receiver_fingerprint))
                     if fp != fingerprints[n]]
            if stale or (p.sender, p.receiver) != (sender, receiver):
                logger.warning("profile %s was made for other weights of %s; re-run `droidspeak profile "
                               "--sender %s --receiver %s`; that pair prefills in full", path,
                               " and ".join(stale) or "the pair", sender, receiver)
                statuses[(sender, receiver)] = f"stale: made for other weights of {' and '.join(stale) or 'the pair'}"
                continue
            profiles.append(p)
    return profiles, statuses
