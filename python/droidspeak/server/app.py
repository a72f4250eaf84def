"""FastAPI application: SGLang's native API and the OpenAI API over one AsyncEngine.

Every hosted model has a name; the native endpoints also live under
`/models/{name}/...`, so `sgl.RuntimeEndpoint(f"{url}/models/{name}")` drives one model.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from droidspeak.errors import DroidspeakError, InvalidRequestError, ModelNotFoundError
from droidspeak.server.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2


@dataclass
class ServerState:
    engine: AsyncEngine
    api_key: str | None = None
    log_requests: bool = False

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
        status = 404 if isinstance(exc, ModelNotFoundError) else 400
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        param = exc.field if isinstance(exc, InvalidRequestError) else None
        return JSONResponse(error_body(str(exc), status, param, kind), status_code=status)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if state.api_key and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {state.api_key}":
                return JSONResponse(error_body("invalid or missing API key", 401, kind="authentication_error"),
                                    status_code=401)
        return await call_next(request)

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from fastapi.responses import Response

    from droidspeak.server.metrics import ServerMetrics
    metrics = ServerMetrics(state.engine.scheduler, state.model_names, state.log_requests,
                            name_of=state.engine.engine.model_name_of)
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

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code)

    return app


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


async def collect(aengine: AsyncEngine, reqs, fmt: dict, request: Request) -> list[dict]:
    """Final results of `reqs`; if the client disconnects first, the requests are
    aborted (their KV freed) and the handler gives up."""
    import asyncio

    async def consume():
        results: list = [None] * len(reqs)
        async for index, result, finished in aengine.generate(reqs, fmt):
            if finished:
                results[index] = result
        return results

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    work, watcher = asyncio.ensure_future(consume()), asyncio.ensure_future(watch())
    done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        watcher.cancel()
        return work.result()
    work.cancel()  # the generator's cleanup aborts the unfinished requests
    raise ClientDisconnected()


class ClientDisconnected(Exception):
    pass


async def read_json(request: Request) -> dict:
    """The body as a JSON object, or a 400 naming what is wrong."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"malformed JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("the JSON body must be an object")
    return body
