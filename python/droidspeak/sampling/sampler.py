"""Turn fp32 logits into next tokens: penalties, min-token masking, temperature,
top-k / top-p / min-p filtering, seeded sampling, and logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from droidspeak import kernels
from droidspeak.sampling.params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request."""
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator
    banned_ids: list[int]  # masked while the request is below min_new_tokens


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]                 # log p(token) under the unprocessed distribution
    top_logprobs: list[list[tuple[float, int]]] | None


def apply_penalties(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.int64)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and row.output_ids:
        ids, counts = torch.tensor(row.output_ids, dtype=torch.int64).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.float() + p.presence_penalty
    return logits


def filter_probs(probs: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Zero out tokens outside top-k, top-p and min-p; the result is not renormalised."""
    if p.min_p > 0:
        probs = torch.where(probs < p.min_p * probs.max(), 0.0, probs)
    if p.top_k > 0 or p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = torch.ones_like(sorted_probs, dtype=torch.bool)
        if p.top_k > 0:
            keep[p.top_k:] = False
        if p.top_p < 1:
            # keep the smallest head of the distribution whose mass reaches top_p
            before = sorted_probs.cumsum(0) - sorted_probs
            keep &= before < p.top_p
        sorted_probs = torch.where(keep, sorted_probs, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def sample(logits: torch.Tensor, rows: list[SamplingRow], top_logprobs_nums: list[int],
           return_logprobs: list[bool] | None = None) -> SampleResult:
    """logits [B, V] fp32 (modified in place). Logprobs are computed for the rows
    of `return_logprobs` (default: every row); the others' are NaN (a log-softmax
    over the vocabulary is a tenth of a greedy batch-16 decode step's sampling)."""
    want = [i for i, w in enumerate(return_logprobs or [True] * len(rows)) if w]
    raw_logprobs = None
    if want:
        raw = logits if len(want) == len(rows) else logits.index_select(0, torch.tensor(want))
        raw_logprobs = torch.log_softmax(raw, dim=-1)  # before penalties and masks change logits
    tokens: list[int] = []
    greedy: list[int] = []
    for i, row in enumerate(rows):
        p = row.params
        li = logits[i]
        if p.has_penalties:
            apply_penalties(li, row)
        if row.banned_ids and len(row.output_ids) < p.min_new_tokens:
            li[torch.tensor(row.banned_ids, dtype=torch.int64)] = float("-inf")
        if p.is_greedy:
            greedy.append(i)
            tokens.append(-1)
            continue
        probs = filter_probs(torch.softmax(li / p.temperature, dim=-1), p)
        tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    if greedy:  # one argmax over the batch (after every row's penalties and masks)
        best = kernels.argmax_rows(logits).tolist()
        for i in greedy:
            tokens[i] = best[i]
    chosen = [float("nan")] * len(rows)
    top = None
    if raw_logprobs is not None:
        picked = torch.tensor([tokens[i] for i in want], dtype=torch.int64)
        for i, lp in zip(want, raw_logprobs.gather(1, picked[:, None]).squeeze(1).tolist()):
            chosen[i] = lp
        k_max = max((top_logprobs_nums[i] for i in want), default=0)
        if k_max > 0:
            vals, ids = raw_logprobs.topk(k_max, dim=-1)
            vals, ids = vals.tolist(), ids.tolist()
            top = [[] for _ in rows]
            for j, i in enumerate(want):
                top[i] = list(zip(vals[j][:top_logprobs_nums[i]], ids[j][:top_logprobs_nums[i]]))
    return SampleResult(tokens, chosen, top)
