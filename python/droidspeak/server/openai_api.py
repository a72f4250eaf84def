"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions."""
from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from droidspeak.engine.io import num_prompts
from droidspeak.errors import InvalidRequestError
from droidspeak.server.handlers import (ServerState, body_schema, client_of, collect, guard, internal_failure_event,
                                        parse_body, prepare)

router = APIRouter(prefix="/v1")


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    rid: str | None = None
    request_timeout_s: float | None = None
    wait_for_kv_store: bool = False

    def sampling_params(self, max_tokens: int | None) -> dict:
        params = {"max_new_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "min_p": self.min_p, "n": self.n, "stop": self.stop,
                  "stop_token_ids": self.stop_token_ids, "presence_penalty": self.presence_penalty,
                  "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
                  "sampling_seed": self.seed, "ignore_eos": self.ignore_eos, "min_new_tokens": self.min_tokens}
        return {k: v for k, v in params.items() if v is not None}


class CompletionRequest(CommonParams):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatRequest(CommonParams):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def _finish(reason: dict | None) -> str | None:
    if reason is None:
        return None
    return {"stop": "stop", "length": "length"}.get(reason["type"], "abort")


def _usage(reqs, results: dict[int, dict]) -> dict:
    """Token counts of the finished `results` (by index into `reqs`); the n
    samples of one prompt count the prompt once, as OpenAI does."""
    prompts = {}
    for index, r in results.items():
        req = reqs[index]
        prompts.setdefault(req.parent_rid or req.rid, r["meta_info"])
    prompt_tokens = sum(m["prompt_tokens"] for m in prompts.values())
    cached = sum(m["cached_tokens"] for m in prompts.values())
    completion = sum(r["meta_info"]["completion_tokens"] for r in results.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _stream(request: Request, aengine, reqs, fmt: dict, envelope: dict, make_choice, include_usage: bool,
            first_choices: tuple = ()) -> StreamingResponse:
    """SSE stream of chunks `envelope + {"choices": [make_choice(...)]}`, one per
    progress report; `make_choice(index, text_delta, result, finished, tokens_sent)`."""
    async def events():
        for choice in first_choices:
            yield _sse(dict(envelope, choices=[choice]))
        sent_text, sent_tokens, finals = [0] * len(reqs), [0] * len(reqs), {}
        async for index, result, finished in guard(request, aengine.generate(reqs, fmt, client_of(request))):
            delta = result["text"][sent_text[index]:]
            choice = make_choice(index, delta, result, finished, sent_tokens[index])
            sent_text[index], sent_tokens[index] = len(result["text"]), len(result["output_ids"])
            if finished:
                finals[index] = result
            yield _sse(dict(envelope, choices=[choice]))
            if failure := internal_failure_event(result, finished):
                yield failure
        if include_usage:
            yield _sse(dict(envelope, choices=[], usage=_usage(reqs, finals)))
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


@router.get("/models")
async def list_models(request: Request):
    state: ServerState = request.app.state.ds
    created = int(state.engine.started)
    engine = state.engine.engine
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "droidspeak",
         "root": engine.lineage[name].lineage, "parent": engine.lineage[name].parent,
         "lineage": engine.lineage[name].lineage, "max_model_len": engine.runner.context_length}
        for name in state.model_names]}


@router.post("/completions", openapi_extra=body_schema(CompletionRequest))
async def completions(request: Request):
    body = await parse_body(request, CompletionRequest)
    state: ServerState = request.app.state.ds
    aengine = state.resolve_model(body.model)
    engine = aengine.engine
    if body.echo:
        raise InvalidRequestError("echo is not supported", "echo")
    prompt = body.prompt
    ids_given = isinstance(prompt, list) and prompt and not isinstance(prompt[0], str)
    text, ids = (None, prompt) if ids_given else (prompt, None)
    reqs, _ = await prepare(request, aengine, num_prompts(text, ids) * max(body.n, 1), lambda: engine.make_requests(
        prompt=text, input_ids=ids, sampling_params=body.sampling_params(body.max_tokens), stream=body.stream,
        return_logprob=body.logprobs is not None, top_logprobs_num=body.logprobs or 0, model=body.model,
        timeout_s=body.request_timeout_s, wait_for_kv_store=body.wait_for_kv_store))
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model_name
    fmt = dict(tokenizer=engine.tokenizer, return_text_in_logprobs=True)

    def choice(index: int, text: str, result: dict, finished: bool) -> dict:
        lp = None
        if body.logprobs is not None:
            meta = result["meta_info"]
            entries = meta["output_token_logprobs"]
            lp = {"tokens": [t for _, _, t in entries], "token_logprobs": [v for v, _, _ in entries],
                  "top_logprobs": [{t: v for v, _, t in top} for top in meta.get("output_top_logprobs", [])],
                  "text_offset": []}
        return {"index": index, "text": text, "logprobs": lp,
                "finish_reason": _finish(result["meta_info"]["finish_reason"]) if finished else None}

    if body.stream:
        envelope = {"id": rid, "object": "text_completion", "created": created, "model": model}
        return _stream(request, aengine, reqs, fmt, envelope,
                       lambda index, delta, result, finished, _: choice(index, delta, result, finished),
                       bool(body.stream_options and body.stream_options.include_usage))

    results = await collect(aengine, reqs, fmt, request)
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [choice(i, r["text"], r, True) for i, r in enumerate(results)],
            "usage": _usage(reqs, dict(enumerate(results)))}


def _chat_prompt_ids(engine, messages: list[ChatMessage]) -> list[int]:
    convo = []
    for m in messages:
        content = m.content
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if any(part.get("type") != "text" for part in content):
                raise InvalidRequestError("only text content parts are supported", "messages")
            content = "".join(part.get("text", "") for part in content)
        convo.append({"role": m.role, "content": content or ""})
    engine.check_text_length(sum(len(m["role"]) + len(m["content"]) for m in convo), field="messages")
    if engine.tokenizer.chat_template is None:
        raise InvalidRequestError("this model has no chat template; use /v1/completions", "messages")
    try:
        ids = engine.tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=True)
    except (UnicodeError, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"messages cannot be rendered and tokenized: {exc}", "messages") from exc
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


@router.post("/chat/completions", openapi_extra=body_schema(ChatRequest))
async def chat_completions(request: Request):
    body = await parse_body(request, ChatRequest)
    state: ServerState = request.app.state.ds
    aengine = state.resolve_model(body.model)
    engine = aengine.engine
    if not body.messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens

    def make():
        ids = _chat_prompt_ids(engine, body.messages)
        tokens = max_tokens if max_tokens is not None else max(1, min(engine.runner.context_length - len(ids), 2048))
        return engine.make_requests(
            input_ids=ids, sampling_params=body.sampling_params(tokens), stream=body.stream,
            return_logprob=body.logprobs, top_logprobs_num=body.top_logprobs or 0, model=body.model,
            timeout_s=body.request_timeout_s, wait_for_kv_store=body.wait_for_kv_store)
    reqs, _ = await prepare(request, aengine, max(body.n, 1), make)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model_name
    fmt = dict(tokenizer=engine.tokenizer, return_text_in_logprobs=True)

    def logprobs(result: dict, start: int = 0):
        if not body.logprobs:
            return None
        meta = result["meta_info"]
        tops = meta.get("output_top_logprobs", [])
        content = []
        for i, (v, _, t) in enumerate(meta["output_token_logprobs"][start:], start):
            top = [{"token": tt, "logprob": vv, "bytes": list(tt.encode())} for vv, _, tt in tops[i]] if i < len(tops) else []
            content.append({"token": t, "logprob": v, "bytes": list(t.encode()), "top_logprobs": top})
        return {"content": content}

    if body.stream:
        envelope = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(index, delta, result, finished, tokens_sent):
            reason = _finish(result["meta_info"]["finish_reason"]) if finished else None
            return {"index": index, "delta": {"content": delta} if delta else {},
                    "logprobs": logprobs(result, tokens_sent), "finish_reason": reason}
        opening = tuple({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for i in range(len(reqs)))
        return _stream(request, aengine, reqs, fmt, envelope, chunk,
                       bool(body.stream_options and body.stream_options.include_usage), opening)

    results = await collect(aengine, reqs, fmt, request)
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                         "logprobs": logprobs(r), "finish_reason": _finish(r["meta_info"]["finish_reason"])}
                        for i, r in enumerate(results)],
            "usage": _usage(reqs, dict(enumerate(results)))}
