"""`droidspeak serve` / `python -m droidspeak.launch_server`: start the HTTP server."""
from __future__ import annotations

import argparse
import logging
import signal

from droidspeak.config import EngineConfig

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 30000
DEFAULT_MAX_BODY_MB = 64
RESERVED_ROW_SHARE = 1 / 8  # of max_running_requests, by default, for claimants holding no row


def serving_reserved_rows(max_running_requests: int) -> int:
    return max(1, int(max_running_requests * RESERVED_ROW_SHARE)) if max_running_requests > 1 else 0


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not on /health)")
    parser.add_argument("--log-requests", action="store_true", help="log every request")
    parser.add_argument("--max-request-body-mb", type=int, default=DEFAULT_MAX_BODY_MB,
                        help="refuse request bodies larger than this with 413, before reading them "
                             f"(default: {DEFAULT_MAX_BODY_MB})")


def serve(args: argparse.Namespace, engine_kwargs: dict) -> int:
    import uvicorn

    from droidspeak.engine.engine import Engine
    from droidspeak.server.app import ServerState, create_app
    from droidspeak.server.async_engine import AsyncEngine

    if engine_kwargs.get("reserved_running_requests") is None:
        engine_kwargs = dict(engine_kwargs, reserved_running_requests=serving_reserved_rows(
            engine_kwargs.get("max_running_requests") or EngineConfig.max_running_requests))
    aengine = AsyncEngine(factory=lambda: Engine(**engine_kwargs))
    aengine.start()
    engine = aengine.engine
    logger.info("%d of %d running rows kept for clients holding none", engine.scheduler.reserved_rows,
                engine.config.max_running_requests)
    app = create_app(ServerState(aengine, api_key=args.api_key, log_requests=args.log_requests,
                                 max_body_bytes=args.max_request_body_mb << 20))
    logger.info("serving %s on http://%s:%d", ", ".join(engine.model_names), args.host, args.port)
    # uvicorn catches SIGINT/SIGTERM, shuts down gracefully, then re-raises the signal
    # under the handlers it found installed: make those no-ops so that a requested
    # shutdown ends the process normally (exit status 0) after cleanup.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.log_requests else "warning",
                    timeout_graceful_shutdown=5)
    finally:
        aengine.shutdown()
    return 0


def add_serve_parser(sub, add_engine_args, engine_kwargs) -> None:
    p = sub.add_parser("serve", help="start the HTTP server (SGLang native API + OpenAI API)")
    add_engine_args(p)
    add_server_args(p)
    p.set_defaults(func=lambda args: serve(args, engine_kwargs(args)))
