"""Appending a sampled token to a request and deciding whether it is done."""
from __future__ import annotations

import time

from droidspeak.scheduler.request import FinishReason, Req


def finish(req: Req, reason: FinishReason) -> None:
    if req.finished:
        return
    req.finish_reason = reason
    if reason.kind != "stop" or not isinstance(reason.matched, str):
        req.detokenizer.flush()
        req.output_text = req.detokenizer.text


def append_token(req: Req, token: int, logprob: float, top: list | None,
                 eos_token_ids: list[int], context_length: int) -> None:
    p = req.sampling_params
    if req.first_token_time is None:
        req.first_token_time = time.perf_counter()
    req.output_ids.append(token)
    if req.return_logprob:
        req.output_token_logprobs.append((logprob, token))
        if req.top_logprobs_num > 0 and top is not None:
            req.output_top_logprobs.append(top)
    stop_token = (token in p.stop_token_ids) or (not p.ignore_eos and token in eos_token_ids)
    if stop_token:
        if p.no_stop_trim:
            req.detokenizer.add([token])
        finish(req, FinishReason("stop", matched=token))
        return
    delta = req.detokenizer.add([token])
    req.output_text = req.detokenizer.text
    if p.stop and delta:
        _check_stop_strings(req, len(delta))
        if req.finished:
            return
    if len(req.output_ids) >= p.max_new_tokens or req.seq_len >= context_length:
        finish(req, FinishReason("length", length=len(req.output_ids)))


def _check_stop_strings(req: Req, delta_len: int) -> None:
    text = req.detokenizer.text
    p = req.sampling_params
    for s in p.stop:
        # A match must end inside the new text; search only where it can start.
        at = text.find(s, max(0, len(text) - delta_len - len(s) + 1))
        if at != -1:
            req.output_text = text if p.no_stop_trim else text[:at]
            finish(req, FinishReason("stop", matched=s))
            return
