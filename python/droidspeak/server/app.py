"""FastAPI application: SGLang's native API and the OpenAI API over one AsyncEngine.

Every hosted model has a name; the native endpoints also live under
`/models/{name}/...`, so `sgl.RuntimeEndpoint(f"{url}/models/{name}")` drives one model.
"""
from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from droidspeak.errors import (BodyTooLargeError, DroidspeakError, InvalidRequestError, LimitExceededError,
                               ModelNotFoundError, QueueFullError)
from droidspeak.server.handlers import (ClientDisconnected, InternalFailure, ServerState, body_too_large,
                                       error_body)
from droidspeak.server.native import router as native_router
from droidspeak.server.openai_api import router as openai_router

logger = logging.getLogger(__name__)


def create_app(state: ServerState) -> FastAPI:
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
