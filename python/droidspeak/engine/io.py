"""Request inputs in, SGLang-shaped result dicts out."""
from __future__ import annotations

import time
import uuid

from droidspeak.errors import InvalidRequestError
from droidspeak.scheduler.request import Req


def _is_ints(ids) -> bool:
    return isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)


def _is_token_list(ids) -> bool:
    """One prompt's token ids (a batch is a list of such lists; an empty one is the
    scheduler's "empty prompt" error)."""
    return bool(ids) and _is_ints(ids)


def num_prompts(prompt, input_ids) -> int:
    """How many prompts a call holds (a string or one token list: 1), read before
    validation (normalize_inputs refuses malformed ones)."""
    given = prompt if prompt is not None else input_ids
    if isinstance(given, str) or _is_token_list(given):
        return 1
    return len(given) if isinstance(given, list) else 1


def normalize_inputs(prompt, input_ids, sampling_params, rid):
    """-> (prompts: texts or token id lists, sampling param dicts, rids, single?).
    Texts are not tokenized here: the caller checks its limits first."""
    if (prompt is None) == (input_ids is None):
        raise InvalidRequestError("give exactly one of text (prompt) or input_ids", "text")
    if prompt is not None:
        single = isinstance(prompt, str)
        prompts = [prompt] if single else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(t, str) for t in prompts):
            raise InvalidRequestError("text must be a string or a non-empty list of strings", "text")
    else:
        single = _is_token_list(input_ids)
        prompts = [input_ids] if single else input_ids
        if not isinstance(prompts, list) or not prompts or not all(_is_ints(p) for p in prompts):
            raise InvalidRequestError("input_ids must be a list of ints or a list of such lists", "input_ids")
    n = len(prompts)
    if isinstance(sampling_params, list):
        if len(sampling_params) != n:
            raise InvalidRequestError(f"{len(sampling_params)} sampling_params for {n} prompts", "sampling_params")
        params = sampling_params
    else:
        params = [sampling_params] * n
    if rid is None:
        rids = [uuid.uuid4().hex for _ in range(n)]
    elif isinstance(rid, str) and single:
        rids = [rid]
    elif isinstance(rid, list) and len(rid) == n and all(isinstance(r, str) for r in rid):
        rids = rid
    else:
        raise InvalidRequestError("rid must be a string (one prompt) or a list of strings, one per prompt", "rid")
    return prompts, params, rids, single


def per_prompt(value, name: str, n: int) -> list:
    """One value per prompt: SGLang accepts a scalar for all or a list of n."""
    if isinstance(value, list):
        if len(value) != n:
            raise InvalidRequestError(f"{name} has {len(value)} entries for {n} prompts", name)
        return value
    return [value] * n


def _with_text(entries, tokenizer, with_text: bool):
    if not with_text:
        return [list(e) for e in entries]
    return [[lp, tid, tokenizer.decode([tid])] for lp, tid in entries]


def format_output(req: Req, tokenizer, return_text_in_logprobs: bool = False) -> dict:
    meta = {
        "id": req.rid,
        "finish_reason": req.finish_reason.to_dict() if req.finish_reason else None,
        "prompt_tokens": len(req.origin_input_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "cross_model_cached_tokens": req.cross_model_tokens,
        "kv_store_cached_tokens": req.store_tokens,
        "e2e_latency": time.perf_counter() - req.created_time,
    }
    if req.first_token_time is not None:
        meta["ttft"] = req.first_token_time - req.created_time
    if req.return_logprob:
        meta["input_token_logprobs"] = _with_text(req.input_token_logprobs, tokenizer, return_text_in_logprobs)
        meta["output_token_logprobs"] = _with_text(req.output_token_logprobs, tokenizer, return_text_in_logprobs)
        if req.top_logprobs_num > 0:
            meta["input_top_logprobs"] = [
                None if t is None else _with_text(t, tokenizer, return_text_in_logprobs)
                for t in req.input_top_logprobs]
            meta["output_top_logprobs"] = [_with_text(t, tokenizer, return_text_in_logprobs)
                                           for t in req.output_top_logprobs]
    return {"text": req.output_text, "output_ids": list(req.output_ids), "meta_info": meta}
