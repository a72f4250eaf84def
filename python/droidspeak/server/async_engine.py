"""The serving loop: the scheduler runs in one background thread; the HTTP event
loop submits requests and awaits their outputs through asyncio queues.

Why a thread and not processes: on 2 cores the model's torch ops release the GIL
for nearly all of a step, so the event loop stays responsive, and a thread avoids
pickling every request and token across process boundaries
(benchmark/bench_process_split.py measures the two layouts).

Every torch op of the engine runs on that one thread, its construction included
(`AsyncEngine.build`): OpenMP keeps one worker team per thread that starts
parallel regions, and with two teams on 2 cores libgomp stops spinning between
regions, so every short kernel pays a futex wake-up (docs/architecture.md).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from droidspeak.engine.engine import Engine
from droidspeak.engine.io import format_output
from droidspeak.errors import LimitExceededError, QueueFullError
from droidspeak.scheduler.request import AbortCause, Req
from droidspeak.scheduler.scheduler import StepFailed

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long the loop sleeps on an empty inbox when idle


# What the event loop sends the scheduler thread through the inbox.
@dataclass
class _Add:
    reqs: list[Req]


@dataclass
class _Abort:  # their client went away
    reqs: list[Req]


@dataclass
class _AbortRid:
    rid: str


@dataclass
class _Call:
    fn: Callable
    future: concurrent.futures.Future
QUEUE_TOKENS_PER_REQUEST = 256  # default queue limit: one queued request per this many KV pool tokens
RETRY_AFTER_S = 1  # Retry-After of a 429 for a full queue


class AsyncEngine:
    def __init__(self, engine: Engine | None = None, factory: Callable[[], Engine] | None = None):
        """Serve `engine`, or the engine that `factory` builds on the scheduler
        thread itself (what the server does; see the module docstring)."""
        if (engine is None) == (factory is None):
            raise ValueError("pass an engine or a factory")
        self._factory = factory
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        if engine is not None:
            self._attach(engine)
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, dict]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="droidspeak-scheduler", daemon=True)
        # Tokenizing runs off the event loop, one call at a time (the tokenizer is not
        # safe for concurrent encodes); its backlog is bounded by max_queued_requests.
        self._tokenizer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="droidspeak-tokenizer")
        self._preparing = 0       # sub-requests being tokenized (event loop only)
        self._in_inbox = 0        # sub-requests handed to the scheduler thread, not yet queued there
        self._inbox_lock = threading.Lock()
        # Per client (peer address): sub-requests being tokenized (event loop only),
        # and sub-requests submitted and not yet finished (under _inbox_lock).
        self._client_preparing: collections.Counter = collections.Counter()
        self._client_live: collections.Counter = collections.Counter()
        self._client_of: dict[int, str] = {}  # id(req) -> its client, until it finishes
        self.started = time.time()
        self.on_finished: Callable[[Req], None] | None = None  # metrics hook, called on the scheduler thread

    def _attach(self, engine: Engine) -> None:
        self.engine = engine
        self.scheduler = engine.scheduler
        c = engine.config
        self.max_queued_requests = c.max_queued_requests if c.max_queued_requests is not None else max(
            2 * c.max_running_requests, engine.runner.max_total_tokens // QUEUE_TOKENS_PER_REQUEST)
        self.max_requests_per_client = c.max_requests_per_client if c.max_requests_per_client is not None else (
            max(1, (c.max_running_requests + self.max_queued_requests) // 2))
        logger.info("queue limit: %d requests waiting beyond %d running; per client: %s", self.max_queued_requests,
                    c.max_running_requests, self.max_requests_per_client or "no limit")

    def start(self) -> None:
        """Start the scheduler thread; returns once the engine is ready, or raises
        what building it raised."""
        self._thread.start()
        self._ready.result()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    # ---- called from the event loop ------------------------------------------
    @property
    def num_queued(self) -> int:
        """Sub-requests admitted but not running: tokenizing, on their way to the
        scheduler, waiting or mid-way through a chunked prefill."""
        # Read from the event loop while the scheduler thread changes the lists: a
        # length may be one step old, which the limit tolerates.
        s = self.scheduler
        return self._preparing + self._in_inbox + len(s.waiting) + (s.chunked_req is not None)

    async def prepare(self, count: int, make: Callable[[], tuple[list[Req], bool]], client: str | None = None
                      ) -> tuple[list[Req], bool]:
        """Room for `count` sub-requests of `client` (QueueFullError if there is
        none now; a count more than the server ever holds is refused outright),
        then `make()` (which tokenizes) on the tokenizer thread. A count over the
        fan-out limit reserves the limit: make() refuses the call."""
        c = self.engine.config
        count = min(count, c.max_fanout_per_request)
        if count > self.max_queued_requests + c.max_running_requests:
            raise LimitExceededError(
                f"the request fans out to {count} sub-requests; this server holds at most "
                f"{c.max_running_requests} running + {self.max_queued_requests} queued (max_queued_requests)",
                "n", "max_queued_requests")
        per_client = self.max_requests_per_client
        if client is not None and per_client:
            if count > per_client:
                raise LimitExceededError(f"the request fans out to {count} sub-requests; one client may have at "
                                         f"most {per_client} in flight (max_requests_per_client)",
                                         "n", "max_requests_per_client")
            held = self._client_preparing[client] + self._client_live[client]
            if held + count > per_client:
                raise QueueFullError(f"client {client} has {held} requests in flight; at most {per_client} "
                                     "(max_requests_per_client); retry later", RETRY_AFTER_S)
        free_rows = self.scheduler.req_pool.available_size  # rows no admitted request holds
        if self.num_queued + count > self.max_queued_requests + free_rows:
            raise QueueFullError(f"the server's queue is full ({self.num_queued} requests waiting, at most "
                                 f"{self.max_queued_requests}: max_queued_requests); retry later",
                                 RETRY_AFTER_S)
        self._preparing += count
        self._client_preparing[client] += count
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenizer, make)
        finally:
            self._preparing -= count
            self._client_preparing[client] -= count
            if not self._client_preparing[client]:
                del self._client_preparing[client]

    async def generate(self, reqs: list[Req], fmt: dict, client: str | None = None
                       ) -> AsyncIterator[tuple[int, dict, bool]]:
        """Yield (index in reqs, formatted output, finished) as the scheduler reports
        progress. If the consumer stops early (client gone), the rest is aborted.
        `client` (its peer address) is charged for the requests until they finish."""
        loop = asyncio.get_running_loop()
        out_queue: asyncio.Queue = asyncio.Queue()
        for i, r in enumerate(reqs):
            self._streams[id(r)] = (loop, out_queue, dict(fmt, index=i))
        with self._inbox_lock:
            self._in_inbox += len(reqs)
            if client is not None:
                self._client_live[client] += len(reqs)
                self._client_of.update((id(r), client) for r in reqs)
        if client is not None and self.max_requests_per_client:
            # Admission's fair share (round robin, reserved rows) goes per client:
            # many small calls from one client are one claimant, not many.
            for r in reqs:
                r.group = ("client", client)
        self._inbox.put(_Add(reqs))
        pending = len(reqs)
        try:
            while pending:
                index, result, finished = await out_queue.get()
                if finished:
                    pending -= 1
                yield index, result, finished
        finally:
            unfinished = [r for r in reqs if not r.finished]
            if unfinished:
                self._inbox.put(_Abort(unfinished))
            for r in reqs:
                self._streams.pop(id(r), None)

    def abort(self, rid: str) -> None:
        """Abort the requests named `rid` (and each sample of an n > 1 prompt given it)."""
        self._inbox.put(_AbortRid(rid))

    async def call(self, fn: Callable):
        """Run `fn()` on the scheduler thread (between steps) and await its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Call(fn, future))
        return await asyncio.wrap_future(future)

    # ---- the scheduler thread ----------------------------------------------------
    def _main(self) -> None:
        if self._factory is not None:
            try:
                self._attach(self._factory())
            except BaseException as exc:  # re-raised by start()
                self._ready.set_exception(exc)
                return
        self._ready.set_result(None)
        self._run()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox(block=not self.scheduler.has_work)
            if not self.scheduler.has_work:
                try:
                    self.engine.idle_tick()
                except Exception:  # pragma: no cover - background work must not stop serving
                    logger.exception("idle work failed")
                continue
            try:
                outputs = self.scheduler.step()
            except StepFailed as failed:  # logged by the scheduler; the rest keeps running
                outputs = failed.outputs
            except Exception:  # outside any step's requests: fail everything in flight
                logger.exception("scheduler failed outside a step; aborting every request in flight")
                outputs = self.scheduler.abort_all(AbortCause.INTERNAL)
            for out in outputs:
                self._publish(out.req, out.finished)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            match item:
                case _Add(reqs):
                    for r in reqs:
                        self.scheduler.enqueue(r)
                    with self._inbox_lock:
                        self._in_inbox -= len(reqs)
                case _Abort(reqs):
                    for out in self.scheduler.abort(reqs, AbortCause.DISCONNECT):
                        self._publish(out.req, True)
                case _AbortRid(rid):
                    for out in self.scheduler.abort_request(rid):
                        self._publish(out.req, True)
                case _Call(fn, future):
                    try:
                        future.set_result(fn())
                    except Exception as exc:  # surfaced to the awaiting handler
                        future.set_exception(exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None

    def _publish(self, req: Req, finished: bool) -> None:
        if finished:
            with self._inbox_lock:
                client = self._client_of.pop(id(req), None)
                if client is not None:
                    self._client_live[client] -= 1
                    if not self._client_live[client]:
                        del self._client_live[client]
            if self.on_finished is not None:
                self.on_finished(req)
        entry = self._streams.get(id(req))
        if entry is None:
            return
        loop, out_queue, fmt = entry
        fmt = dict(fmt)
        index = fmt.pop("index")
        result = format_output(req, **fmt)
        deliver = lambda *_: loop.call_soon_threadsafe(out_queue.put_nowait, (index, result, finished))  # noqa: E731
        pending = [f for f in req.store_writes if not f.done()] if finished and req.wait_for_kv_store else []
        if pending:
            # The answer goes out once its chunks are in the store's tiers (the
            # writer thread completes them), without holding up the scheduler.
            when_all(pending, deliver)
        else:
            deliver()


def when_all(futures: list[concurrent.futures.Future], callback: Callable[[], None]) -> None:
    """Call `callback()` once every one of `futures` is done (on the thread that
    completes the last)."""
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_):
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            callback()
    for f in futures:
        f.add_done_callback(one_done)
