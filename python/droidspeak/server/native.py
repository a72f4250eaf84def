"""SGLang's native endpoints."""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from droidspeak.engine.io import num_prompts, per_prompt
from droidspeak.errors import InvalidRequestError
from droidspeak.tokenizer.tokenizer import encode_text
from droidspeak.server.handlers import (ServerState, body_schema, client_of, collect, fanout, guard,
                                        internal_failure_event, parse_body, prepare, read_json)

router = APIRouter()


class GenerateRequest(BaseModel):
    """SGLang's GenerateReqInput (the fields droidspeak uses; others are ignored)."""
    model_config = ConfigDict(extra="ignore")
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None
    model: str | list[str | None] | None = None
    lora_path: str | list[str | None] | None = None
    request_timeout_s: float | None = None
    wait_for_kv_store: bool = False

    def member(self, prompts: int) -> str | list[str | None] | None:
        """The family member of each prompt: its `lora_path` entry, else its `model`
        entry (each one value for all prompts or a list of one per prompt)."""
        models = per_prompt(self.model, "model", prompts)
        loras = per_prompt(self.lora_path, "lora_path", prompts)
        names = [lora if lora is not None else m for m, lora in zip(models, loras)]
        return names[0] if len(set(names)) == 1 else names


def _state(request: Request) -> ServerState:
    return request.app.state.ds


def _engine_for(request: Request, model_name: str | None):
    return _state(request).resolve_model(model_name)


@router.api_route("/generate", methods=["POST", "PUT"], openapi_extra=body_schema(GenerateRequest))
async def generate(request: Request, model_name: str | None = None):
    body = await parse_body(request, GenerateRequest)
    prompts = num_prompts(body.text, body.input_ids)
    model = model_name or body.member(prompts)
    aengine = _engine_for(request, None if isinstance(model, list) else model)
    engine = aengine.engine
    reqs, single = await prepare(request, aengine, fanout(prompts, body.sampling_params), lambda: engine.make_requests(
        body.text, body.sampling_params, body.input_ids, return_logprob=body.return_logprob,
        logprob_start_len=body.logprob_start_len, top_logprobs_num=body.top_logprobs_num,
        stream=body.stream, rid=body.rid, model=model, timeout_s=body.request_timeout_s,
        wait_for_kv_store=body.wait_for_kv_store))
    fmt = dict(tokenizer=engine.tokenizer, return_text_in_logprobs=body.return_text_in_logprobs)
    if body.stream:
        async def events():
            async for index, result, finished in guard(request, aengine.generate(reqs, fmt, client_of(request))):
                if not single:
                    result["index"] = index
                yield f"data: {json.dumps(result)}\n\n"
                if failure := internal_failure_event(result, finished):
                    yield failure
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    results = await collect(aengine, reqs, fmt, request)
    return results[0] if single else results


@router.get("/health")
async def health(request: Request, model_name: str | None = None):
    _engine_for(request, model_name)
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request, model_name: str | None = None):
    aengine = _engine_for(request, model_name)
    reqs, _ = aengine.engine.make_requests(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0},
                                           model=model_name)
    async for _ in aengine.generate(reqs, dict(tokenizer=aengine.engine.tokenizer)):
        pass
    return Response(status_code=200)


def _model_info(state: ServerState, aengine, name: str | None) -> dict:
    engine = aengine.engine
    name = name or state.model_name
    lineage = engine.lineage[name]
    mc = engine.runner.model_config
    return {"model_path": engine.model_path, "tokenizer_path": engine.model_path,
            "served_model_name": name, "is_generation": True, "fingerprint": engine.identity(name),
            "lineage": lineage.lineage, "parent": lineage.parent,
            "preferred_sampling_params": None, "weight_version": "default",
            "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": "llama" if mc.architecture.startswith("Llama") else "qwen2",
            "architectures": [mc.architecture]}


@router.get("/get_model_info")
@router.get("/model_info")
async def model_info(request: Request, model_name: str | None = None):
    return _model_info(_state(request), _engine_for(request, model_name), model_name)


@router.get("/get_server_info")
@router.get("/server_info")
async def server_info(request: Request, model_name: str | None = None):
    import dataclasses
    aengine = _engine_for(request, model_name)
    engine = aengine.engine
    info = dataclasses.asdict(engine.config)
    info.update(model_path=engine.model_path, tokenizer_path=engine.model_path,
                served_model_name=model_name or _state(request).model_name, dtype=engine.config.resolved_dtype,
                max_total_num_tokens=engine.runner.max_total_tokens,
                max_queued_requests=aengine.max_queued_requests,
                max_requests_per_client=aengine.max_requests_per_client,
                reserved_running_requests=engine.scheduler.reserved_rows,
                context_length=engine.runner.context_length,
                version=__import__("droidspeak").__version__, dp_size=1, tp_size=1,
                cross_model_pairs=engine.cross_policy.describe(),
                kv_store_stats=engine.offloader.stats() if engine.offloader is not None else None)
    return info


@router.get("/get_load")
async def get_load(request: Request, model_name: str | None = None):
    sched = _engine_for(request, model_name).scheduler
    used = sched.runner.max_total_tokens - sched.allocator.available_size - sched.cache.evictable_size
    return [{"dp_rank": 0, "num_reqs": len(sched.running), "num_waiting_reqs": len(sched.waiting),
             "num_tokens": used}]


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request, model_name: str | None = None):
    aengine = _engine_for(request, model_name)
    ok = await aengine.call(aengine.scheduler.flush_cache)
    if ok:
        return PlainTextResponse("Cache flushed.\n")
    return PlainTextResponse("Cache not flushed: requests are in flight.\n", status_code=400)


@router.post("/abort_request")
async def abort_request(request: Request, model_name: str | None = None):
    body = await read_json(request)
    rid = body.get("rid")
    if not isinstance(rid, str):
        raise InvalidRequestError("rid must be a string", "rid")
    _engine_for(request, model_name).abort(rid)
    return Response(status_code=200)


class TokenizeRequest(BaseModel):
    prompt: str | None = None
    text: str | None = None
    add_special_tokens: bool = False


@router.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
async def tokenize(request: Request, model_name: str | None = None):
    body = await parse_body(request, TokenizeRequest)
    engine = _engine_for(request, model_name).engine
    text = body.prompt if body.prompt is not None else body.text
    if text is None:
        raise InvalidRequestError("give prompt (or text) to tokenize", "prompt")
    ids = encode_text(engine.tokenizer, text, "prompt", body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.runner.context_length}


class DetokenizeRequest(BaseModel):
    tokens: list[int]
    skip_special_tokens: bool = True


@router.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
async def detokenize(request: Request, model_name: str | None = None):
    body = await parse_body(request, DetokenizeRequest)
    engine = _engine_for(request, model_name).engine
    vocab = engine.runner.model_config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"token {bad[0]} outside [0, {vocab})", "tokens")
    return {"text": engine.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)}



class LoadLoRARequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    lora_name: str


@router.post("/load_lora_adapter", openapi_extra=body_schema(LoadLoRARequest))
async def load_lora_adapter(request: Request):
    body = await parse_body(request, LoadLoRARequest)
    aengine = _state(request).engine
    await aengine.call(lambda: aengine.engine.load_lora_adapter(body.lora_name, body.lora_path))
    return {"success": True, "error_message": "", "loaded_adapters": aengine.engine.lora_adapters}


@router.post("/unload_lora_adapter", openapi_extra=body_schema(UnloadLoRARequest))
async def unload_lora_adapter(request: Request):
    body = await parse_body(request, UnloadLoRARequest)
    aengine = _state(request).engine
    await aengine.call(lambda: aengine.engine.unload_lora_adapter(body.lora_name))
    return {"success": True, "error_message": "", "loaded_adapters": aengine.engine.lora_adapters}


@router.post("/reload_cross_model_profiles")
async def reload_cross_model_profiles(request: Request, model_name: str | None = None):
    """Read the cross-model profile directory again; every ordered pair's status."""
    aengine = _state(request).engine
    pairs = await aengine.call(aengine.engine.reload_cross_model_profiles)
    return {"success": True, "cross_model_pairs": pairs}
