from __future__ import annotations

from dataclasses import dataclass

from droidspeak.scheduler.request import Req


@dataclass
class RequestOutput:
    """A progress report on one request: emitted every step for streaming requests
    that made progress, and once when any request finishes."""
    req: Req
    finished: bool
