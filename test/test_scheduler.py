"""Continuous batching, prefix cache hits, chunked prefill, memory pressure, aborts."""
import pytest

from droidspeak import Engine
from droidspeak.errors import InvalidRequestError, PromptTooLongError
from droidspeak.scheduler.policy import order_waiting
from conftest import assert_no_leak

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Radix trees share prefixes; schedulers batch",
    "Ünïcödé: naïve café",
    "Caching keys and values saves recomputation across requests. Caching keys",
]


def ids_of(outs):
    return [o["output_ids"] for o in outs]


def test_batched_equals_unbatched(tiny_engine):
    batched = tiny_engine.generate(PROMPTS, GREEDY)
    tiny_engine.flush_cache()
    solo = [tiny_engine.generate(p, GREEDY) for p in PROMPTS]
    assert ids_of(batched) == ids_of(solo)
    assert all(len(o["output_ids"]) == 24 for o in batched)
    assert_no_leak(tiny_engine)


def test_prefix_hit_equals_miss(tiny_engine):
    tiny_engine.flush_cache()
    prompt = PROMPTS[4]
    cold = tiny_engine.generate(prompt, GREEDY)
    warm = tiny_engine.generate(prompt, GREEDY)
    n = cold["meta_info"]["prompt_tokens"]
    assert cold["meta_info"]["cached_tokens"] == 0
    # everything but the last prompt token comes from the cache
    assert warm["meta_info"]["cached_tokens"] == n - 1
    assert warm["output_ids"] == cold["output_ids"]
    # a different continuation of a shared prefix hits the shared part only
    other = tiny_engine.generate(prompt + " more text", GREEDY)
    assert other["meta_info"]["cached_tokens"] >= n - 1
    tiny_engine.flush_cache()
    assert other["output_ids"] == tiny_engine.generate(prompt + " more text", GREEDY)["output_ids"]
    assert_no_leak(tiny_engine)


def test_chunked_prefill_equals_unchunked(tiny_llama, tiny_engine):
    long_prompt = " ".join(PROMPTS) * 3
    ref = tiny_engine.generate(long_prompt, GREEDY)
    chunked = Engine(tiny_llama, dtype="float32", max_total_tokens=4096, chunked_prefill_size=16)
    out = chunked.generate([long_prompt, PROMPTS[0]], GREEDY)
    assert out[0]["output_ids"] == ref["output_ids"]
    assert out[1]["output_ids"] == tiny_engine.generate(PROMPTS[0], GREEDY)["output_ids"]
    assert_no_leak(chunked)


def test_memory_pressure_requests_wait_and_complete(tiny_llama, tiny_engine):
    """A pool far smaller than the work: requests queue, running ones are retracted
    when decode runs out of slots, and every request still completes with the same
    tokens as on a roomy pool."""
    params = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    prompts = [f"{p} #{i}" for i, p in enumerate(PROMPTS * 3)]
    ref = tiny_engine.generate(prompts, params)
    small = Engine(tiny_llama, dtype="float32", max_total_tokens=160, max_running_requests=8,
                   chunked_prefill_size=32)
    out = small.generate(prompts, params)
    assert ids_of(out) == ids_of(ref)
    assert small.scheduler.num_retractions > 0
    assert_no_leak(small)


def test_request_larger_than_pool_is_refused(tiny_llama):
    small = Engine(tiny_llama, dtype="float32", max_total_tokens=64)
    with pytest.raises(PromptTooLongError, match="KV pool"):
        small.generate(input_ids=list(range(3, 80)), sampling_params={"max_new_tokens": 1})


def test_prompt_and_token_validation(tiny_engine):
    ctx = tiny_engine.runner.context_length
    with pytest.raises(PromptTooLongError, match="context length"):
        tiny_engine.generate(input_ids=[5] * ctx, sampling_params={"max_new_tokens": 1})
    with pytest.raises(InvalidRequestError, match="outside"):
        tiny_engine.generate(input_ids=[5, 10**6])
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_engine.generate(input_ids=[[]])
    assert_no_leak(tiny_engine)


def test_abort_frees_everything(tiny_engine):
    stream = tiny_engine.generate(PROMPTS[1], {"temperature": 0, "max_new_tokens": 50, "ignore_eos": True},
                                  stream=True)
    first = next(stream)
    assert first["meta_info"]["finish_reason"] is None
    stream.close()  # the consumer goes away mid-generation
    assert_no_leak(tiny_engine)
    # abort of a queued request
    reqs, _ = tiny_engine.make_requests(PROMPTS[0], GREEDY)
    tiny_engine.scheduler.add_request(reqs[0])
    (out,) = tiny_engine.scheduler.abort_request(reqs[0].rid)
    assert out.finished and reqs[0].finish_reason.kind == "abort"
    assert reqs[0].finish_reason.to_dict()["cause"] == "abort_request"
    assert tiny_engine.scheduler.abort_request("no-such-rid") == []
    assert_no_leak(tiny_engine)


def test_disable_radix_cache(tiny_llama, tiny_engine):
    ref = tiny_engine.generate(PROMPTS, GREEDY)
    engine = Engine(tiny_llama, dtype="float32", max_total_tokens=1024, disable_radix_cache=True)
    first = engine.generate(PROMPTS, GREEDY)
    again = engine.generate(PROMPTS[0], GREEDY)
    assert ids_of(first) == ids_of(ref)
    assert again["meta_info"]["cached_tokens"] == 0
    assert engine.runner.allocator.available_size == 1024


def test_lpm_orders_by_cached_prefix(tiny_engine):
    tiny_engine.flush_cache()
    tiny_engine.generate(PROMPTS[4], GREEDY)
    reqs, _ = tiny_engine.make_requests([PROMPTS[0], PROMPTS[4] + " again"], GREEDY)
    lpm = order_waiting(reqs, "lpm", tiny_engine.scheduler.cache)
    fcfs = order_waiting(reqs, "fcfs", tiny_engine.scheduler.cache)
    assert lpm == [reqs[1], reqs[0]] and fcfs == reqs


def test_flush_cache(tiny_engine):
    tiny_engine.generate(PROMPTS[0], GREEDY)
    assert tiny_engine.scheduler.cache.total_size > 0
    assert tiny_engine.flush_cache()
    assert tiny_engine.scheduler.cache.total_size == 0
    assert tiny_engine.runner.allocator.available_size == tiny_engine.runner.max_total_tokens
