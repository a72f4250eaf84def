"""FastAPI application: SGLang's native API and the OpenAI API over one AsyncEngine.

Every hosted model has a name; the native endpoints also live under
`/models/{name}/...`, so `sgl.RuntimeEndpoint(f"{url}/models/{name}")` drives one model.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from droidspeak.errors import (BodyTooLargeError, DroidspeakError, InvalidRequestError, LimitExceededError,
                               ModelNotFoundError, QueueFullError)
from droidspeak.scheduler.request import AbortCause
from droidspeak.server.async_engine import AsyncEngine
from droidspeak.server.launch import DEFAULT_MAX_BODY_MB

logger = logging.getLogger(__name__)


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


def create_app(state: ServerState) -> FastAPI:
    from droidspeak.server.native import router as native_router
    from droidspeak.server.openai_api import router as openai_router

    app = FastAPI(title="droidspeak", version=__import__("droidspeak").__version__)
    app.state.ds = state

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else first.get("msg", "invalid request")
        return JSONResponse(error_body(msg, 400, loc or None), status_code=400)

    @app.exception_handler(DroidspeakError)
    async def on_engine_error(request: Request, exc: DroidspeakError):
        return engine_error_response(state, exc)

    app.add_middleware(AdmissionMiddleware, state=state)

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from fastapi.responses import Response

    from droidspeak.server.metrics import ServerMetrics
    metrics = ServerMetrics(state.engine.scheduler, state.model_names, state.log_requests,
                            name_of=state.engine.engine.model_name_of, queued=lambda: state.engine.num_queued)
    state.metrics = metrics
    state.engine.on_finished = metrics.observe_finished

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(native_router)
    app.include_router(native_router, prefix="/models/{model_name}")
    app.include_router(openai_router)

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, exc: ClientDisconnected):
        return JSONResponse(error_body("client disconnected", 499), status_code=499)

    @app.exception_handler(InternalFailure)
    async def on_internal_failure(request: Request, exc: InternalFailure):
        return JSONResponse(error_body(str(exc), 500, kind="internal_error"), status_code=500)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code)

    return app


def engine_error_response(state: ServerState, exc: DroidspeakError) -> JSONResponse:
    """The 4xx for a typed error (counted in /metrics when a limit refused it)."""
    headers = None
    if isinstance(exc, ModelNotFoundError):
        status, kind = 404, "not_found_error"
    elif isinstance(exc, QueueFullError):
        status, kind, headers = 429, "rate_limit_error", {"Retry-After": str(exc.retry_after_s)}
        state.metrics.rejected.labels(reason="queue_full").inc()
    elif isinstance(exc, BodyTooLargeError):
        status, kind = 413, "invalid_request_error"
        state.metrics.rejected.labels(reason="body_size").inc()
    else:
        status, kind = 400, "invalid_request_error"
        if isinstance(exc, LimitExceededError):
            state.metrics.rejected.labels(reason="limit").inc()
    param = exc.field if isinstance(exc, InvalidRequestError) else None
    body = error_body(str(exc), status, param, kind)
    if isinstance(exc, LimitExceededError):
        body["error"]["limit"] = exc.limit
    return JSONResponse(body, status_code=status, headers=headers)


class AdmissionMiddleware:
    """The API key check and the body size cap (from Content-Length, before any of
    the body is read). Plain ASGI: Starlette's BaseHTTPMiddleware would hide the
    client's disconnect from the handlers, which must abort work on it."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        key = self.state.api_key
        if key and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):  # constant time
                return JSONResponse(error_body("invalid or missing API key", 401, kind="authentication_error"),
                                    status_code=401)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.state.max_body_bytes:
            return engine_error_response(self.state, body_too_large(int(declared), self.state.max_body_bytes))
        return None


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
