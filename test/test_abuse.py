"""Overload and abuse: limits answered with 400/413/429 that name the field and the
limit, clients that disconnect at every stage of a request (nothing they caused
keeps running or holds KV), fair admission behind a fan-out, and deadlines.

The server runs in this process (uvicorn on a loopback port, the scheduler on its
own thread) so a test can hold the engine inside a stage (a gate on the tokenizer,
the store or the forward) and run the full leak audit on the scheduler thread."""
import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from conftest import assert_no_leak
from test_server import assert_idle, free_port, load

from droidspeak.kvstore.link import ThrottledTier
from droidspeak.runner.batch import ForwardMode
from droidspeak.scheduler.request import AbortCause

LONG = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0}
GATE_TIMEOUT_S = 30


class InProcessServer:
    def __init__(self, model_path: str, max_body_mb: int = 64, **engine_kwargs):
        from droidspeak import Engine
        from droidspeak.server.app import ServerState, create_app
        from droidspeak.server.async_engine import AsyncEngine
        kwargs = dict(dtype="float32", max_total_tokens=4096, served_model_name="tiny")
        kwargs.update(engine_kwargs)
        self.aengine = AsyncEngine(factory=lambda: Engine(model_path, **kwargs))
        self.aengine.start()
        self.engine = self.aengine.engine
        app = create_app(ServerState(self.aengine, max_body_bytes=max_body_mb << 20))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def audit(self) -> None:
        """Idle over HTTP, then the full leak audit (slots, E-cache rows, request
        rows, node locks, tree references) on the scheduler thread."""
        assert_idle(self.url)
        asyncio.run(self.aengine.call(lambda: assert_no_leak(self.engine)))

    def metrics(self) -> dict[str, float]:
        values = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.aengine.shutdown()


def aborted(server, cause: str) -> float:
    return server.metrics().get(f'droidspeak_aborted_requests_total{{cause="{cause}"}}', 0.0)


def rejected(server, reason: str) -> float:
    return server.metrics().get(f'droidspeak_rejected_requests_total{{reason="{reason}"}}', 0.0)


class Gate:
    """Replaces `obj.name` with a wrapper that, once armed, holds the call (after
    `skip` matching calls pass) until released, so a test can act while the engine
    is inside that stage."""

    def __init__(self, obj, name: str, when=lambda *a, **k: True):
        self.inner = getattr(obj, name)
        self.when = when
        self.entered, self.released = threading.Event(), threading.Event()
        self.armed, self.skip = False, 0
        setattr(obj, name, self)
        self._restore = lambda: setattr(obj, name, self.inner)

    def arm(self, skip: int = 0) -> None:
        self.entered.clear()
        self.released.clear()
        self.armed, self.skip = True, skip

    def __call__(self, *args, **kwargs):
        if self.armed and self.when(*args, **kwargs):
            if self.skip:
                self.skip -= 1
            else:
                self.armed = False
                self.held_args = args
                self.entered.set()
                self.released.wait(GATE_TIMEOUT_S)
        return self.inner(*args, **kwargs)

    def wait_entered(self) -> None:
        assert self.entered.wait(GATE_TIMEOUT_S), "the engine never reached the gated stage"

    def release(self) -> None:
        self.armed = False
        self.released.set()

    def remove(self) -> None:
        self.release()
        self._restore()


class RawClient:
    """One HTTP/1.1 request on a plain socket, so the test decides to the moment
    when the client goes away."""

    def __init__(self, url: str, path: str, body: dict | None = None, raw: bytes | None = None,
                 headers: dict | None = None, source: str | None = None):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=GATE_TIMEOUT_S,
                                             source_address=(source, 0) if source else None)
        data = json.dumps(body).encode() if raw is None else raw
        head = {"Host": host, "Content-Type": "application/json", "Content-Length": str(len(data))}
        head.update(headers or {})
        lines = [f"POST {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if raw is None and body is None
                                                                        else data))

    def read_until(self, marker: bytes) -> bytes:
        buf = b""
        while marker not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        return buf

    def response(self) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of a complete response."""
        buf = self.read_until(b"\r\n\r\n")
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return status, headers, json.loads(rest[:length])

    def drop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture(scope="module")
def server(tiny_llama):
    s = InProcessServer(tiny_llama, max_body_mb=1, max_running_requests=4, chunked_prefill_size=64,
                        max_n=8, max_prompts_per_request=6, max_fanout_per_request=12, max_requests_per_client=16,
                        kv_store="ram", kv_store_write="through", kv_store_chunk_size=16,
                        kv_store_levels="lossless", kv_store_load="always")
    yield s
    s.close()


# ---- limits ----------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.mark.parametrize("path, body, field, limit", [
    ("/generate", {"text": "hi", "sampling_params": {"n": 9}}, "n", "max_n"),
    ("/generate", {"text": ["hi"] * 7}, "text", "max_prompts_per_request"),
    ("/generate", {"input_ids": [[5, 6]] * 7}, "input_ids", "max_prompts_per_request"),
    ("/generate", {"text": ["hi"] * 4, "sampling_params": {"n": 4}}, "n", "max_fanout_per_request"),
    ("/v1/completions", {"prompt": "hi", "n": 9}, "n", "max_n"),
    ("/v1/completions", {"prompt": ["hi"] * 7}, "text", "max_prompts_per_request"),
    ("/v1/completions", {"prompt": ["hi"] * 4, "n": 4}, "n", "max_fanout_per_request"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n", "max_n"),
])
def test_fanout_limits_are_400s_naming_the_field_and_the_limit(server, path, body, field, limit):
    before = rejected(server, "limit")
    err = _error(httpx.post(server.url + path, json=body), 400)
    assert err["param"] == field and err["limit"] == limit and limit in err["message"]
    assert rejected(server, "limit") == before + 1
    server.audit()


@pytest.mark.parametrize("path, body", [
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 100000}}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}),
])
def test_max_new_tokens_is_bounded_by_the_context(server, path, body):
    err = _error(httpx.post(server.url + path, json=body), 400)
    assert err["param"] == "max_new_tokens" and "context length" in err["message"]


def test_text_too_long_for_any_tokenization_is_refused_before_tokenizing(server):
    engine = server.engine
    calls = []
    gates = [Gate(engine.tokenizer, name, when=lambda *a, **k: calls.append(a) or False)
             for name in ("encode", "apply_chat_template")]
    for gate in gates:
        gate.arm()  # records every call, holds none
    try:
        huge = "a" * (engine.runner.context_length * engine._max_token_chars + 1)
        err = _error(httpx.post(server.url + "/generate", json={"text": huge}), 400)
        assert err["param"] == "text" and "characters" in err["message"]
        chat = {"messages": [{"role": "user", "content": huge}]}
        err = _error(httpx.post(server.url + "/v1/chat/completions", json=chat), 400)
        assert err["param"] == "messages"
        assert calls == []  # the tokenizer never saw either text
        ok = httpx.post(server.url + "/generate", json={"text": "short", "sampling_params": {"max_new_tokens": 1}})
        assert ok.status_code == 200 and len(calls) == 1
    finally:
        for gate in gates:
            gate.remove()


def test_bodies_over_the_cap_get_413_before_they_are_read(server):
    before = rejected(server, "body_size")
    # Declared too large: answered from the headers, the body never sent.
    client = RawClient(server.url, "/generate", headers={"Content-Length": str(2 << 20)})
    status, _, body = client.response()
    client.drop()
    assert status == 413 and "max-request-body-mb 1" in body["error"]["message"]
    # No length declared (chunked): refused once the cap is passed.
    chunks = (b'{"text": "' + b"a" * 65536 for _ in range(24))
    r = httpx.post(server.url + "/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most 1048576" in r.json()["error"]["message"]
    assert rejected(server, "body_size") == before + 2
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_full_queue_answers_429_with_retry_after_on_both_apis(tiny_llama):
    s = InProcessServer(tiny_llama, max_running_requests=1, max_queued_requests=2, max_requests_per_client=0)
    gate = Gate(s.engine.runner, "forward")
    try:
        # A fan-out larger than the server ever holds could never be admitted: a 400.
        err = _error(httpx.post(s.url + "/generate", json={"text": "x", "sampling_params": {"n": 4}}), 400)
        assert err["limit"] == "max_queued_requests" and "1 running + 2 queued" in err["message"]
        gate.arm()
        streams = [RawClient(s.url, "/generate", {"text": "hold the step", "sampling_params": LONG})]
        gate.wait_entered()  # the scheduler is inside the first prefill; the next two only queue
        streams += [RawClient(s.url, "/generate", {"text": f"queued {i}", "sampling_params": LONG}) for i in range(2)]
        deadline = time.time() + 10
        while s.aengine.num_queued < 2:
            assert time.time() < deadline
            time.sleep(0.02)
        r = httpx.post(s.url + "/generate", json={"text": "one too many"})
        err = _error(r, 429)
        assert r.headers["retry-after"] == "1" and "max_queued_requests" in err["message"]
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(s.url + "/v1/chat/completions", json=chat)
        assert _error(r, 429)["type"] == "rate_limit_error"
        assert rejected(s, "queue_full") == 2
        assert s.metrics()['droidspeak_num_queue_reqs{model_name="tiny"}'] == 2
        for c in streams:
            c.drop()
        time.sleep(0.5)  # the handlers see the clients go while the step is still held
        gate.release()
        s.audit()
        print({k: v for k, v in s.metrics().items() if "abort" in k or "requests_total" in k})
        assert aborted(s, "disconnect") == 3
        # The server keeps serving once the queue drains.
        ok = httpx.post(s.url + "/generate", json={"text": "after", "sampling_params": {"max_new_tokens": 2}})
        assert ok.status_code == 200
    finally:
        gate.remove()
        s.close()


def test_one_client_cannot_fill_the_queue_for_the_others(tiny_llama):
    s = InProcessServer(tiny_llama, max_running_requests=1, max_queued_requests=4, max_requests_per_client=2)
    gate = Gate(s.engine.runner, "forward")
    try:
        err = _error(httpx.post(s.url + "/generate", json={"text": "x", "sampling_params": {"n": 3}}), 400)
        assert err["limit"] == "max_requests_per_client"
        gate.arm()
        mine = [RawClient(s.url, "/generate", {"text": "hold the step", "sampling_params": LONG})]
        gate.wait_entered()
        mine.append(RawClient(s.url, "/generate", {"text": "mine, queued", "sampling_params": LONG}))
        deadline = time.time() + 10
        while s.aengine.num_queued < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        third = RawClient(s.url, "/generate", {"text": "one too many for me"})
        status, headers, body = third.response()
        assert status == 429 and "max_requests_per_client" in body["error"]["message"]
        assert headers["retry-after"] == "1"
        other = RawClient(s.url, "/generate", {"text": "another client", "sampling_params": {"max_new_tokens": 2}},
                          source="127.0.0.2")
        gate.release()
        status, _, body = other.response()
        assert status == 200 and body["meta_info"]["completion_tokens"] == 2
        for c in mine + [third, other]:
            c.drop()
        s.audit()
        assert s.aengine._client_live == {} and s.aengine._client_preparing == {}
    finally:
        gate.remove()
        s.close()


# ---- disconnects at each stage ---------------------------------------------------------
SHAPES = {
    "native": ("/generate", lambda p, sp: {"text": p, "sampling_params": sp}, 1),
    "native-stream": ("/generate", lambda p, sp: {"text": p, "sampling_params": sp, "stream": True}, 1),
    "native-batch": ("/generate", lambda p, sp: {"text": [p, p + " again"], "sampling_params": sp}, 2),
    "native-n": ("/generate", lambda p, sp: {"text": p, "sampling_params": dict(sp, n=3), "stream": True}, 3),
    "openai-completions": ("/v1/completions", lambda p, sp: {
        "prompt": p, "max_tokens": sp["max_new_tokens"], "temperature": 0, "ignore_eos": True, "n": 2}, 2),
    "openai-chat-stream": ("/v1/chat/completions", lambda p, sp: {
        "messages": [{"role": "user", "content": p}], "max_tokens": sp["max_new_tokens"], "temperature": 0,
        "ignore_eos": True, "stream": True}, 1),
}


def send(server, shape: str, prompt: str, params: dict = LONG) -> tuple[RawClient, int]:
    path, make, count = SHAPES[shape]
    return RawClient(server.url, path, make(prompt, params)), count


def dropped(server, before: float, count: int) -> None:
    """The dropped client's `count` sub-requests were aborted as disconnected and
    nothing they held is left."""
    deadline = time.time() + 10
    while aborted(server, "disconnect") < before + count:
        assert time.time() < deadline, f"{aborted(server, 'disconnect') - before} of {count} aborted"
        time.sleep(0.05)
    assert aborted(server, "disconnect") == before + count
    server.audit()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_dropped_during_decode(server, shape):
    before = aborted(server, "disconnect")
    client, count = send(server, shape, f"decode stage {shape}")
    deadline = time.time() + 10
    while load(server.url)["num_reqs"] < count:  # all of its sub-requests are decoding
        assert time.time() < deadline
        time.sleep(0.02)
    client.drop()
    dropped(server, before, count)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_dropped_while_queued(server, shape):
    # Four long decodes hold every row (and fit the pool's reservation for their
    # outputs); the dropped client's requests only wait.
    blocker = RawClient(server.url, "/generate", {"text": "a blocker", "stream": True,
                                                  "sampling_params": dict(LONG, n=4, max_new_tokens=1200)})
    try:
        deadline = time.time() + 10
        while load(server.url)["num_reqs"] < 4:
            assert time.time() < deadline
            time.sleep(0.02)
        before = aborted(server, "disconnect")
        client, count = send(server, shape, f"queued stage {shape}")
        while load(server.url)["num_waiting_reqs"] < count:
            assert time.time() < deadline
            time.sleep(0.02)
        client.drop()
        deadline = time.time() + 5
        while load(server.url)["num_waiting_reqs"]:  # gone while the blocker still runs
            assert time.time() < deadline
            time.sleep(0.02)
        assert load(server.url)["num_reqs"] == 4
        assert aborted(server, "disconnect") == before + count
    finally:
        blocker.drop()
    server.audit()


@pytest.mark.parametrize("shape", ["native", "openai-chat-stream"])
def test_dropped_during_tokenization(server, shape):
    gate = Gate(server.engine, "_encode") if shape == "native" else Gate(
        server.engine.tokenizer, "apply_chat_template")
    try:
        enqueued = []
        scheduler = server.engine.scheduler
        enqueue, scheduler.enqueue = scheduler.enqueue, lambda r: enqueued.append(r) or enqueue(r)
        before = aborted(server, "disconnect")
        gate.arm()
        client, count = send(server, shape, "tokenize me slowly")
        gate.wait_entered()
        client.drop()
        time.sleep(0.5)  # the server notices the disconnect while the tokenizer is held
        gate.release()
        dropped(server, before, count)
        assert enqueued == []  # nothing of it ever reached the scheduler
    finally:
        scheduler.enqueue = enqueue
        gate.remove()


def drop_in_extend(server, shape: str, prompt: str, params: dict = LONG, skip: int = 0):
    """Send, hold the forward of the request's (skip + 1)-th prefill chunk, drop the
    client there, then let the step finish; returns the held batch."""
    gate = Gate(server.engine.runner, "forward", when=lambda batch, *a: batch.mode == ForwardMode.EXTEND)
    try:
        before = aborted(server, "disconnect")
        gate.arm(skip=skip)
        client, count = send(server, shape, prompt, params)
        gate.wait_entered()
        client.drop()
        time.sleep(0.3)
        gate.release()
        dropped(server, before, count)
    finally:
        gate.remove()
    return gate.held_args[0]


@pytest.mark.parametrize("shape", ["native", "native-n", "openai-completions"])
def test_dropped_during_prefill(server, shape):
    assert drop_in_extend(server, shape, f"prefill stage {shape}").prefix_lens[0] < 64


@pytest.mark.parametrize("shape", ["native-stream", "openai-chat-stream"])
def test_dropped_during_chunked_prefill(server, shape):
    prompt = " ".join(f"word{i}" for i in range(120))
    assert len(server.engine.tokenize(prompt)) > 2 * 64  # more than two 64-token chunks
    held = drop_in_extend(server, shape, prompt, dict(LONG, max_new_tokens=100), skip=1)
    assert held.prefix_lens[0] >= 64  # it was a later chunk's forward


def test_dropped_while_its_prefix_loads_from_the_kv_store(server):
    engine = server.engine
    prompt = " ".join(f"stored{i}" for i in range(60))
    r = httpx.post(server.url + "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 200
    engine.offloader.flush()
    assert httpx.post(server.url + "/flush_cache").status_code == 200
    state = engine.offloader.store.states[0]
    fast = state.tier
    state.tier = ThrottledTier(fast, bandwidth_bytes_per_s=1e9, latency_s=0.3)  # per lookup and read
    try:
        before = aborted(server, "disconnect")
        client, count = send(server, "native", prompt)
        time.sleep(0.45)  # looked up; its chunks on the way
        client.drop()
        dropped(server, before, count)
    finally:
        state.tier = fast
    again = httpx.post(server.url + "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 1}})
    assert again.json()["meta_info"]["kv_store_cached_tokens"] > 0  # the store still serves it
    server.audit()


def test_abort_request_by_rid_aborts_every_sample(server):
    body = {"text": "abort all samples", "rid": "many", "stream": True, "sampling_params": dict(LONG, n=3)}
    client = RawClient(server.url, "/generate", body)
    client.read_until(b'"completion_tokens": 2')
    before = aborted(server, "abort_request")
    assert httpx.post(server.url + "/abort_request", json={"rid": "many"}).status_code == 200
    events = client.read_until(b"data: [DONE]").decode()
    client.drop()
    finals = [json.loads(line[6:]) for line in events.splitlines()
              if line.startswith("data: {") and '"finish_reason": {' in line]
    assert sorted(f["meta_info"]["id"] for f in finals) == ["many-0", "many-1", "many-2"]
    assert all(f["meta_info"]["finish_reason"]["cause"] == "abort_request" for f in finals)
    assert aborted(server, "abort_request") == before + 3
    server.audit()


# ---- deadlines ---------------------------------------------------------------------------
@pytest.mark.parametrize("path, body", [
    ("/generate", {"text": "time me out", "sampling_params": LONG, "request_timeout_s": 0.5}),
    ("/v1/completions", {"prompt": "time me out", "max_tokens": 1500, "ignore_eos": True,
                         "request_timeout_s": 0.5}),
])
def test_a_request_past_its_deadline_finishes_as_a_timeout(server, path, body):
    before = aborted(server, "timeout")
    start = time.perf_counter()
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 200 and time.perf_counter() - start < 10
    out = r.json()
    if path == "/generate":
        assert out["meta_info"]["finish_reason"]["cause"] == "timeout"
        assert out["meta_info"]["completion_tokens"] < 1500
    else:
        assert out["choices"][0]["finish_reason"] == "abort" and out["usage"]["completion_tokens"] < 1500
    assert aborted(server, "timeout") == before + 1
    server.audit()


def test_bad_timeouts_are_400s(server):
    err = _error(httpx.post(server.url + "/generate", json={"text": "x", "request_timeout_s": -1}), 400)
    assert err["param"] == "request_timeout_s"


def test_the_server_default_timeout_also_expires_queued_requests(tiny_llama):
    from droidspeak import Engine
    engine = Engine(tiny_llama, dtype="float32", max_total_tokens=1024, max_running_requests=1,
                    request_timeout_s=0.3)
    try:
        running, queued = engine.make_requests(["first", "second"], LONG)[0]
        for r in (running, queued):
            engine.scheduler.add_request(r)
        while not running.output_ids:
            engine.scheduler.step()
        assert queued in engine.scheduler.waiting
        time.sleep(0.35)
        outs = engine.scheduler.step()
        assert {id(o.req) for o in outs if o.finished} == {id(running), id(queued)}
        assert running.finish_reason.cause.value == queued.finish_reason.cause.value == "timeout"
        assert_no_leak(engine)
    finally:
        engine.shutdown()


# ---- fair admission ------------------------------------------------------------------------
def test_a_small_call_behind_a_fanout_starts_at_the_next_step(tiny_llama):
    from droidspeak import Engine
    from droidspeak.scheduler.policy import round_robin
    engine = Engine(tiny_llama, dtype="float32", max_total_tokens=4096, max_running_requests=8,
                    reserved_running_requests=2, chunked_prefill_size=-1)
    try:
        sched = engine.scheduler
        params = dict(LONG, max_new_tokens=200)  # all of them fit the pool: only the rows limit
        flood, _ = engine.make_requests([f"flood {i}" for i in range(12)], params)
        for r in flood:
            sched.add_request(r)
        sched.step()
        assert len(sched.running) == 6  # two rows kept for calls holding none
        (small,), _ = engine.make_requests("a small request", params)
        sched.add_request(small)
        sched.step()
        assert small in sched.running and len(sched.running) == 7
        assert sum(r in sched.waiting for r in flood) == 6
        # Queued calls are taken one request per call per round, in arrival order.
        a, b = flood[:3], engine.make_requests(["b0", "b1"], params)[0]
        assert round_robin(a + b, lambda r: r.group, lambda g: 0) == [a[0], b[0], a[1], b[1], a[2]]
        sched.abort_all(AbortCause.DISCONNECT)
        assert_no_leak(engine)
    finally:
        engine.shutdown()
