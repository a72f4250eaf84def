"""A step that fails — an exception in the forward at prefill, chunked prefill,
decode or a cross-model recompute, or inside a KV-store load — fails only the
requests it was running: they finish with cause `internal_error` (over HTTP a 500
with a JSON body, or an error event after a stream's last chunk), everything they
held is released (the leak audit passes), and every other request and the server
keep going."""
import json

import httpx
import pytest

from conftest import assert_no_leak
from test_abuse import InProcessServer
from test_crossmodel import CONTEXT, QUESTIONS, family, ids_of, make_engine, run  # noqa: F401 (fixture)
from test_kvstore import prompt, store_engine
from test_kvstore import run as store_run

from droidspeak import Engine
from droidspeak.kvstore.offload import PoolLoad
from droidspeak.runner.batch import ForwardMode
from droidspeak.scheduler.request import AbortCause
from droidspeak.scheduler.scheduler import StepFailed

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


class Fault:
    """Makes `runner.forward` raise once, on the first call `when(batch)` selects
    after `skip` selected calls have passed."""

    def __init__(self, runner, when, skip: int = 0):
        self.runner, self.inner, self.when, self.skip = runner, runner.forward, when, skip
        self.fired = False
        runner.forward = self

    def __call__(self, batch, *args, **kwargs):
        if not self.fired and self.when(batch):
            if self.skip:
                self.skip -= 1
            else:
                self.fired = True
                raise RuntimeError("injected fault")
        return self.inner(batch, *args, **kwargs)

    def remove(self) -> None:
        self.runner.forward = self.inner


def is_prefill(batch) -> bool:
    return batch.mode is ForwardMode.EXTEND


def is_decode(batch) -> bool:
    return batch.mode is ForwardMode.DECODE


def submit(engine, ids, params=GREEDY, **kw):
    reqs, _ = engine.make_requests(input_ids=ids, sampling_params=params, **kw)
    for r in reqs:
        engine.scheduler.add_request(r)
    return reqs


def step_until_failure(engine) -> StepFailed:
    for _ in range(200):
        try:
            engine.scheduler.step()
        except StepFailed as failed:
            return failed
    raise AssertionError("the fault never fired")


def drain(engine) -> None:
    while engine.scheduler.has_work:
        engine.scheduler.step()


def assert_failed(failed: StepFailed, reqs) -> None:
    assert {id(o.req) for o in failed.outputs} == {id(r) for r in reqs}
    for r in reqs:
        assert r.finished and r.finish_reason.cause is AbortCause.INTERNAL
        assert "injected fault" in r.finish_reason.message
    assert isinstance(failed.__cause__, RuntimeError)


@pytest.fixture
def engine(tiny_llama):
    e = Engine(tiny_llama, dtype="float32", max_total_tokens=2048, max_running_requests=8)
    yield e
    e.shutdown()


def test_prefill_fault_fails_its_batch_and_spares_the_running(engine):
    alone = engine.generate(input_ids=prompt(1, 40), sampling_params=GREEDY)["output_ids"]
    engine.flush_cache()
    running = submit(engine, prompt(1, 40))
    engine.scheduler.step()  # its prefill
    assert engine.scheduler.running == running
    fault = Fault(engine.runner, is_prefill)
    newcomers = submit(engine, prompt(2, 60)) + submit(engine, prompt(3, 30))
    failed = step_until_failure(engine)
    fault.remove()
    assert_failed(failed, newcomers)
    drain(engine)
    assert running[0].output_ids == alone and running[0].finish_reason.kind == "length"
    assert_no_leak(engine)
    again = engine.generate(input_ids=prompt(2, 60), sampling_params=GREEDY)
    assert again["meta_info"]["finish_reason"]["type"] == "length"
    assert_no_leak(engine)


def test_chunked_prefill_fault_releases_the_chunks_already_run(tiny_llama):
    e = Engine(tiny_llama, dtype="float32", max_total_tokens=2048, chunked_prefill_size=32)
    try:
        ids = prompt(4, 100)
        reference = e.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
        e.flush_cache()
        fault = Fault(e.runner, is_prefill, skip=1)  # the second chunk
        reqs = submit(e, ids)
        failed = step_until_failure(e)
        fault.remove()
        assert_failed(failed, reqs)
        assert e.scheduler.chunked_req is None
        assert_no_leak(e)
        assert e.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"] == reference
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_decode_fault_fails_the_decoding_batch_and_spares_the_queue(tiny_llama):
    e = Engine(tiny_llama, dtype="float32", max_total_tokens=2048, max_running_requests=2)
    try:
        queued_alone = e.generate(input_ids=prompt(7, 20), sampling_params=GREEDY)["output_ids"]
        e.flush_cache()
        decoding = submit(e, prompt(5, 20)) + submit(e, prompt(6, 20))
        queued = submit(e, prompt(7, 20))  # no row for it until the others finish
        fault = Fault(e.runner, is_decode, skip=2)
        failed = step_until_failure(e)
        fault.remove()
        assert_failed(failed, decoding)
        assert not queued[0].finished
        drain(e)
        assert queued[0].output_ids == queued_alone
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_generate_raises_and_the_engine_keeps_working(engine):
    fault = Fault(engine.runner, is_decode)
    with pytest.raises(StepFailed, match="injected fault"):
        engine.generate(input_ids=prompt(8, 30), sampling_params=GREEDY)
    fault.remove()
    assert_no_leak(engine)
    out = engine.generate(input_ids=prompt(8, 30), sampling_params=GREEDY)
    assert len(out["output_ids"]) == GREEDY["max_new_tokens"]


def test_fault_in_a_cross_model_recompute(family):  # noqa: F811 (fixture)
    e = make_engine(family)
    try:
        ctx = len(ids_of(e, CONTEXT))
        run(e, "a", ids_of(e, CONTEXT + QUESTIONS[1]), ctx)  # the sender reads the context
        held = e.runner.allocator.num_referenced
        fault = Fault(e.runner, lambda batch: bool(batch.recompute or batch.fused_recompute))
        receiver = submit(e, ids_of(e, CONTEXT + QUESTIONS[0]), model="b")
        failed = step_until_failure(e)
        fault.remove()
        assert_failed(failed, receiver)
        assert_no_leak(e)
        assert e.runner.allocator.num_referenced == held  # the sender's entry, intact
        again = run(e, "b", ids_of(e, CONTEXT + QUESTIONS[0]), ctx)
        assert again["meta_info"]["cross_model_cached_tokens"] >= ctx
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_fault_inside_a_kv_store_load(tiny_llama, monkeypatch):
    e = store_engine(tiny_llama, kv_store="ram")
    try:
        first = store_run(e, prompt(0))
        for seed in (1, 2, 3):  # push the first prompt out of the pool, into the store
            store_run(e, prompt(seed, 120))
        e.offloader.flush()
        calls = []

        def failing_ensure(self, layer):
            calls.append(layer)
            raise RuntimeError("injected fault")

        monkeypatch.setattr(PoolLoad, "ensure", failing_ensure)
        reqs = submit(e, prompt(0), params={"max_new_tokens": 6, "temperature": 0})
        failed = step_until_failure(e)
        monkeypatch.undo()
        assert calls and reqs[0].kv is None  # its lease, the bound load with it, is released
        assert_failed(failed, reqs)
        assert_no_leak(e)
        again = store_run(e, prompt(0))
        assert again["kv_store_cached_tokens"] > 0
        assert [t for _, t in again["output_token_logprobs"]] == [t for _, t in first["output_token_logprobs"]]
        assert_no_leak(e)
    finally:
        e.shutdown()


def sse_events(response) -> list:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_server_answers_500_and_keeps_serving(tiny_llama):
    server = InProcessServer(tiny_llama)
    try:
        runner = server.engine.runner
        body = {"text": "hello there", "sampling_params": GREEDY}
        fault = Fault(runner, is_prefill)
        r = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "internal_error" and err["code"] == 500 and "injected fault" in err["message"]
        server.audit()
        fault.remove()
        fault = Fault(runner, is_decode)
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 8},
                       timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
        fault.remove()
        fault = Fault(runner, is_decode, skip=2)
        r = httpx.post(server.url + "/generate", json=dict(body, stream=True), timeout=60)
        events = sse_events(r)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert events[-2]["meta_info"]["finish_reason"]["cause"] == "internal_error"
        assert events[-1]["error"]["type"] == "internal_error"
        fault.remove()
        server.audit()
        ok = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert ok.status_code == 200 and ok.json()["meta_info"]["finish_reason"]["type"] == "length"
        assert server.metrics()['droidspeak_aborted_requests_total{cause="internal_error"}'] == 3
        server.audit()
    finally:
        server.close()
