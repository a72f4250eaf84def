"""What the native and OpenAI endpoints share: the server state, error bodies,
body parsing, admission of a request's fan-out, and collecting or streaming its
results while watching for the client's disconnect."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from fastapi import Request

from droidspeak.errors import BodyTooLargeError, InvalidRequestError
from droidspeak.scheduler.request import AbortCause
from droidspeak.server.async_engine import AsyncEngine
from droidspeak.server.launch import DEFAULT_MAX_BODY_MB


@dataclass
class ServerState:
    engine: AsyncEngine
    api_key: str | None = None
    log_requests: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20
    metrics: object = None  # server.metrics.ServerMetrics, set by create_app

    @property
    def model_names(self) -> list[str]:
        return self.engine.engine.model_names

    @property
    def model_name(self) -> str:
        """The family's root model, served when a request names none."""
        return self.model_names[0]

    def resolve_model(self, name: str | None) -> AsyncEngine:
        """The engine serving `name` (None: the root model); 404 for unknown names."""
        self.engine.engine.model_id(name)
        return self.engine


def error_body(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def body_schema(model) -> dict:
    """openapi_extra for a route that parses its own body as `model`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def parse_body(request: Request, model):
    """The body validated as `model`, whatever the Content-Type header says (clients
    such as curl send JSON as form data); errors name the field."""
    from pydantic import ValidationError
    body = await read_json(request)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        field = loc[0] if loc else None  # union branches add type names after the field
        raise InvalidRequestError(f"{field}: {first.get('msg')} (got {first.get('input')!r:.80})"
                                  if field else first.get("msg"), field) from None


def body_too_large(size: int, cap: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"the request body is {size} bytes or more; at most {cap} "
                             f"(--max-request-body-mb {cap >> 20})")


def fanout(prompts: int, sampling_params) -> int:
    """Sub-requests a call of `prompts` prompts asks for, read before validation
    (for the queue check only: make_requests enforces the real limits)."""
    def n_of(p) -> int:
        n = p.get("n", 1) if isinstance(p, dict) else 1
        return n if isinstance(n, int) and n > 0 else 1
    if isinstance(sampling_params, list):
        return sum(n_of(p) for p in sampling_params) or prompts
    return max(prompts, 1) * n_of(sampling_params)


async def prepare(request: Request, aengine: AsyncEngine, count: int, make) -> tuple[list, bool]:
    """What `make()` (Engine.make_requests: sub-requests, single prompt?) returns
    (it tokenizes, so it runs on the tokenizer thread), after reserving queue room
    for `count` sub-requests (429 if there is none). If the client went away
    meanwhile, nothing is submitted."""
    reqs, single = await aengine.prepare(count, make, client_of(request))
    if await request.is_disconnected():
        request.app.state.ds.metrics.aborted.labels(cause=AbortCause.DISCONNECT.value).inc(len(reqs))
        raise ClientDisconnected()
    return reqs, single


def client_of(request: Request) -> str | None:
    """Who sent the request, for the per-client limit: its peer address."""
    return request.client.host if request.client else None


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone. Once the body is read, the server's next
    ASGI message is the disconnect: waiting for it costs nothing while the client
    stays (polling is_disconnected for every open request would hold the GIL the
    scheduler thread needs)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(aengine: AsyncEngine, reqs, fmt: dict, request: Request) -> list[dict]:
    """Final results of `reqs`; if the client disconnects first, the requests are
    aborted (their KV freed) and the handler gives up. A request that an internal
    failure stopped makes the whole answer a 500."""
    results: list = [None] * len(reqs)
    async for index, result, finished in guard(request, aengine.generate(reqs, fmt, client_of(request))):
        if finished:
            results[index] = result
    if any(r is None for r in results):
        raise ClientDisconnected()
    failure = next((m for m in map(internal_failure, results) if m), None)
    if failure:
        raise InternalFailure(failure)
    return results


def internal_failure(result: dict) -> str | None:
    """The message of a finished result that an engine failure stopped, else None."""
    reason = result["meta_info"].get("finish_reason") or {}
    return reason.get("message") if reason.get("cause") == AbortCause.INTERNAL.value else None


def internal_failure_event(result: dict, finished: bool) -> str | None:
    """The SSE error event that follows a streamed request's last chunk when an
    engine failure stopped it (the status line went out with the first chunk)."""
    message = internal_failure(result) if finished else None
    return f"data: {json.dumps(error_body(message, 500, kind='internal_error'))}\n\n" if message else None


class InternalFailure(Exception):
    """A step of the engine failed under the request (answered with a 500)."""


async def guard(request: Request, events):
    """Yield what the async iterator `events` yields until the client disconnects;
    then close it (AsyncEngine.generate aborts its unfinished requests on close).
    Watching for the disconnect matters while nothing is sent: a queued request,
    or a stream between tokens, would otherwise notice only at its next write."""
    watcher = asyncio.ensure_future(_until_disconnected(request))
    step = None
    try:
        while True:
            step = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield item
    finally:
        watcher.cancel()
        if step is not None and not step.done():
            step.cancel()  # the iterator may be closed only once this step has left it
            await asyncio.wait({step})
        await events.aclose()


class ClientDisconnected(Exception):
    pass


async def read_json(request: Request) -> dict:
    """The body as a JSON object, or a 400 naming what is wrong (413 past the size cap)."""
    cap = request.app.state.ds.max_body_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise body_too_large(size, cap)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"malformed JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("the JSON body must be an object")
    return body
