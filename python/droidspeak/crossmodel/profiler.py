"""The offline profiler behind `droidspeak profile`.

For a (sender, receiver) pair it prefills each calibration context with the
sender (keeping its E cache at every candidate group start), then for every
contiguous group [s, e) on a `step`-layer grid, for wholesale reuse, and for
recomputing every layer over only the last part of the context (a *tail*: the
question attends most to the tokens just before it; the context's first token,
the attention sink, is recomputed with it), lets the receiver reuse the
sender's KV with that group recomputed and reads the question
(and answer, or N tokens the receiver generates itself) over it. Each group is
scored against the receiver's own full prefill of the same context: KL of the
next-token distributions, greedy-token agreement, cross-entropy of the real text,
and the share of answers still produced greedily. Runs on the real pools and
kernels through `scheduler.sequence.Sequence`; resumable per context.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from droidspeak.crossmodel.calibration import Item
from droidspeak.crossmodel.profile import GroupScore, Profile, profile_path
from droidspeak.models.identity import fingerprint
from droidspeak.crossmodel.quality import divergence
from droidspeak.runner.batch import SINK_TOKENS
from droidspeak.kvcache.pool import KVLayout
from droidspeak.scheduler.sequence import Sequence

logger = logging.getLogger(__name__)


# Shares of the context recomputed at its end, in sixteenths up to a half, then 3/4.
DEFAULT_TAILS = (0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.75)

Config = tuple[int, int, float]  # (layer start, layer end, tail share of the span)


def sweep_groups(num_layers: int, step: int, tails=DEFAULT_TAILS) -> list[Config]:
    """Wholesale reuse, every contiguous group on the step grid over the whole
    span (the last, [0, num_layers), is the receiver's full prefill), and every
    layer over each tail share of the span."""
    bounds = sorted(set(range(0, num_layers, step)) | {num_layers})
    return ([(0, 0, 1.0)] + [(bounds[i], bounds[j], 1.0) for i in range(len(bounds))
                             for j in range(i + 1, len(bounds))]
            + [(0, num_layers, float(t)) for t in tails if 0 < t < 1])


def grid_layout(num_layers: int, step: int) -> KVLayout:
    """The KV layout the profiler needs: a segment per grid step, E cache at every grid start."""
    bounds = tuple(sorted(set(range(0, num_layers, step)) | {num_layers}))
    return KVLayout(bounds, tuple(b for b in bounds if 0 < b < num_layers))


@dataclass
class Totals:
    """Running sums of one group's scores over the calibration items."""
    nll: float = 0.0
    text_tokens: int = 0
    soft_ce: float = 0.0
    kl: float = 0.0
    items: int = 0
    agree: int = 0
    positions: int = 0
    correct: int = 0
    answered: int = 0

    def add(self, other: "Totals") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def score(self, start: int, end: int, tail: float = 1.0) -> GroupScore:
        n = max(self.items, 1)
        return GroupScore(start, end, self.soft_ce / n, self.nll / max(self.text_tokens, 1), self.kl / n,
                          self.agree / max(self.positions, 1),
                          self.correct / self.answered if self.answered else None, tail)


@dataclass
class Encoded:
    context: list[int]
    suffix: list[int]       # question, then the answer or the receiver's own N greedy tokens
    text_rows: int          # rows of the suffix logits whose targets are real text
    answer_rows: range      # rows predicting the answer's tokens (empty without an answer)


class Profiler:
    def __init__(self, engine, items: list[Item], step: int = 2, context_tokens: int = 512,
                 generate_tokens: int = 16, tails=DEFAULT_TAILS):
        self.engine = engine
        self.runner = engine.runner
        self.items = items
        self.step = step
        self.context_tokens = context_tokens
        self.generate_tokens = generate_tokens
        self.num_layers = self.runner.model_config.num_layers
        self.full = (0, self.num_layers, 1.0)
        self.groups = sweep_groups(self.num_layers, step, tails)

    def _check_layout(self, groups) -> None:
        if not all(self.runner.supports_group(g[0], g[1]) for g in groups):
            raise ValueError(f"the engine's KV layout cannot run groups {sorted(groups)}: build it with "
                             f"grid_layout(num_layers, step)")

    @torch.inference_mode()
    def score_groups(self, sender: str, receiver: str, groups: list[Config],
                     progress: bool = False) -> dict[Config, GroupScore]:
        """Scores of `groups` (plus the full prefill) on the items; nothing written."""
        groups = list(dict.fromkeys([*groups, self.full]))
        self._check_layout(groups)
        totals = {g: Totals() for g in groups}
        with tqdm(total=len(self.items) * len(groups), desc=f"score {sender} -> {receiver}",
                  disable=not progress) as bar:
            for item in self.items:
                for g, t in self._profile_item(sender, receiver, item, groups, bar).items():
                    totals[g].add(t)
        return {g: t.score(*g) for g, t in totals.items()}

    def settings_key(self, sender: str, receiver: str) -> str:
        h = hashlib.sha256(json.dumps([sender, receiver, self.step, self.context_tokens, self.generate_tokens,
                                       self.groups, [asdict(i) for i in self.items], SINK_TOKENS]).encode())
        return h.hexdigest()[:16]

    @torch.inference_mode()
    def profile_pair(self, sender: str, receiver: str, out_dir: str, progress: bool = True) -> Profile:
        self._check_layout(self.groups)
        os.makedirs(out_dir, exist_ok=True)
        partial = os.path.join(out_dir, f".{sender}__{receiver}.partial.jsonl")
        done = self._load_partial(partial, self.settings_key(sender, receiver))
        bar = tqdm(total=len(self.items) * len(self.groups), desc=f"profile {sender} -> {receiver}",
                   disable=not progress, initial=len(done) * len(self.groups))
        for index, item in enumerate(self.items):
            if index in done:
                continue
            per_item = done[index] = self._profile_item(sender, receiver, item, self.groups, bar)
            with open(partial, "a") as f:
                f.write(json.dumps({"item": index, "totals": [[list(g), asdict(t)] for g, t in
                                                              per_item.items()]}) + "\n")
        bar.close()
        scores = {}
        for g in self.groups:
            total = Totals()
            for index in sorted(done):
                total.add(done[index][g])
            per_context = tuple(done[index][g].score(*g).soft_ce for index in sorted(done))
            scores[g] = dataclasses.replace(total.score(*g), soft_ce_items=per_context)
        paths = self.engine.model_paths
        profile = Profile(sender, receiver, self.num_layers, self.step, scores[self.full],
                          [scores[g] for g in self.groups],
                          fingerprint(paths[sender]), fingerprint(paths[receiver]),
                          {"items": len(self.items), "context_tokens": self.context_tokens,
                           "generate_tokens": self.generate_tokens, "sink_tokens": SINK_TOKENS,
                           "domains": sorted({i.domain for i in self.items if i.domain})})
        profile.save(profile_path(out_dir, sender, receiver))
        os.remove(partial)
        return profile

    def _load_partial(self, path: str, key: str) -> dict[int, dict[tuple[int, int], Totals]]:
        """Items finished by an interrupted run with the same settings."""
        if not os.path.isfile(path):
            with open(path, "w") as f:
                f.write(json.dumps({"settings": key}) + "\n")
            return {}
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if not lines or lines[0].get("settings") != key:
            logger.info("%s: settings changed, starting over", path)
            os.remove(path)
            return self._load_partial(path, key)
        done = {}
        for line in lines[1:]:
            done[line["item"]] = {(int(g[0]), int(g[1]), float(g[2])): Totals(**v) for g, v in line["totals"]}
        logger.info("resuming: %d of %d contexts already profiled", len(done), len(self.items))
        return done

    def _encode(self, item: Item, receiver) -> Encoded:
        tok = self.engine.tokenizer
        context = tok.encode(item.context, add_special_tokens=False)[:self.context_tokens]
        question = tok.encode(item.question, add_special_tokens=False)
        if item.answer is not None:
            answer = tok.encode(item.answer, add_special_tokens=False)
            suffix = question + answer
            return Encoded(context, suffix, len(suffix) - 1, range(len(question) - 1, len(suffix) - 1))
        # Text without an answer: the receiver's own greedy continuation follows.
        seq = Sequence(self.runner)
        try:
            seq.extend(context, receiver.model_id, receiver.lora_id)
            logits = seq.extend(question, receiver.model_id, receiver.lora_id)
            generated = []
            for _ in range(self.generate_tokens):
                generated.append(int(logits[-1].argmax()))
                logits = seq.extend(generated[-1:], receiver.model_id, receiver.lora_id)
        finally:
            seq.release()
        return Encoded(context, question + generated, len(question) - 1, range(0))

    def _profile_item(self, sender: str, receiver: str, item: Item, groups, bar) -> dict[Config, Totals]:
        s, r = self.engine.resolve(sender), self.engine.resolve(receiver)
        enc = self._encode(item, r)
        sender_seq = Sequence(self.runner)
        try:
            sender_seq.extend(enc.context, s.model_id, s.lora_id, keep_e=bool(self.runner.layout.e_layers))
            reference = self._suffix_logits(sender_seq, enc, self.full, r)
            out = {}
            for group in groups:
                full = group == self.full
                logits = reference if full else self._suffix_logits(sender_seq, enc, group, r)
                out[group] = self._score(logits, reference, enc)
                bar.update(1)
        finally:
            sender_seq.release()
        return out

    def _suffix_logits(self, sender_seq: Sequence, enc: Encoded, group, receiver) -> torch.Tensor:
        seq = Sequence(self.runner)
        try:
            seq.reuse(sender_seq, len(enc.context), group[:2], receiver.model_id, receiver.lora_id, tail=group[2])
            return seq.extend(enc.suffix, receiver.model_id, receiver.lora_id)[:-1]
        finally:
            seq.release()

    @staticmethod
    def _score(logits: torch.Tensor, reference: torch.Tensor, enc: Encoded) -> Totals:
        targets = torch.tensor(enc.suffix[1:])
        lp = F.log_softmax(logits, -1)
        nll = -lp[:enc.text_rows].gather(1, targets[:enc.text_rows, None]).sum().item()
        d = divergence(lp, F.log_softmax(reference, -1))
        greedy = logits.argmax(-1)
        t = Totals(nll=nll, text_tokens=enc.text_rows, soft_ce=d.soft_ce, kl=d.kl, items=1,
                   agree=int((greedy == reference.argmax(-1)).sum()), positions=int(logits.shape[0]))
        if len(enc.answer_rows):
            rows = torch.tensor(list(enc.answer_rows))
            t.correct, t.answered = int(bool((greedy[rows] == targets[rows]).all())), 1
        return t


def plot_profile(profile: Profile, path: str, quality: float) -> None:
    """Quality against recomputed layers: every group, the frontier, the target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = lambda g: 100 * profile.excess(g)  # noqa: E731
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    whole = [g for g in profile.groups if g.tail == 1]
    tails = [g for g in profile.groups if g.tail < 1]
    ax1.scatter([g.cost for g in whole], [rel(g) for g in whole], s=10, c="0.6", label="contiguous groups")
    if tails:
        ax1.scatter([g.cost for g in tails], [rel(g) for g in tails], s=18, c="C1", marker="^",
                    label="all layers, last part of the context")
    front = profile.frontier
    ax1.plot([g.cost for g in front], [rel(g) for g in front], "o-", c="C0", label="Pareto frontier")
    ax1.axhline(100 * quality, ls="--", c="C3", label=f"target ({100 * quality:.0f}%)")
    target = profile.smallest_meeting(quality)
    if target is not None:
        label = f"[{target.start}, {target.end})" + (f" last {target.tail:.0%}" if target.tail < 1 else "")
        ax1.annotate(label, (target.cost, rel(target)), textcoords="offset points", xytext=(5, 8))
    ax1.set_xlabel("recompute work (layers x share of the context)")
    ax1.set_ylabel("extra soft cross-entropy vs full prefill (%)")
    ax1.legend()
    ax2.scatter([g.cost for g in profile.groups], [100 * g.agreement for g in profile.groups], s=10, c="0.6")
    ax2.plot([g.cost for g in front], [100 * g.agreement for g in front], "o-", c="C0")
    ax2.set_xlabel("recompute work (layers x share of the context)")
    ax2.set_ylabel("greedy agreement with full prefill (%)")
    fig.suptitle(f"{profile.sender} -> {profile.receiver}: {profile.calibration.get('items', '?')} contexts, "
                 f"{profile.num_layers} layers, step {profile.step}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
