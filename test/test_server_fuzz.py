"""Generated request bodies against every endpoint: never a 5xx, the server keeps
serving, and no KV slot is leaked."""
import json
import signal

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import build_tiny_model
from test_server import assert_idle, start_server

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
sampling = st.dictionaries(
    st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
                     "n", "ignore_eos", "repetition_penalty", "frequency_penalty", "regex", "bogus"]),
    json_values, max_size=5)
generate_bodies = st.fixed_dictionaries({}, optional={
    "text": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=3), json_values),
    "input_ids": st.one_of(st.lists(st.integers(-5, 600), max_size=12), json_values),
    "sampling_params": st.one_of(sampling, json_values),
    "stream": st.booleans(),
    "return_logprob": st.one_of(st.booleans(), json_values),
    "logprob_start_len": st.one_of(st.integers(-3, 40), json_values),
    "top_logprobs_num": st.one_of(st.integers(-3, 5), json_values),
    "rid": json_values,
    "model": st.one_of(st.just("tiny"), st.text(max_size=5)),
})
openai_bodies = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just("tiny"), json_values),
    "prompt": st.one_of(st.text(max_size=20), st.lists(st.integers(-5, 600), max_size=8), json_values),
    "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                          "content": st.one_of(st.text(max_size=20), json_values)}),
                                   max_size=3), json_values),
    "max_tokens": st.one_of(st.integers(-2, 80), json_values),
    "temperature": json_values, "top_p": json_values, "n": st.one_of(st.integers(-1, 3), json_values),
    "stop": json_values, "stream": st.booleans(), "logprobs": json_values, "top_logprobs": json_values,
    "stream_options": json_values,
})
ENDPOINTS = [("/generate", generate_bodies), ("/v1/completions", openai_bodies),
             ("/v1/chat/completions", openai_bodies), ("/tokenize", json_values), ("/detokenize", json_values),
             ("/abort_request", json_values), ("/models/tiny/generate", generate_bodies)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = build_tiny_model(str(tmp_path_factory.mktemp("fuzz")), "llama", num_layers=1)
    proc, url = start_server(path, "--context-length", "64")
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.mark.parametrize("path,bodies", ENDPOINTS, ids=[p for p, _ in ENDPOINTS])
def test_generated_bodies_never_5xx(server, path, bodies):
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def check(body):
        r = httpx.post(server + path, content=json.dumps(body, allow_nan=True),
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code >= 400:
            assert "error" in r.json()
    check()
    assert httpx.get(server + "/health").status_code == 200
    assert_idle(server)


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"null", b"{\"text\": \"x\"", b"1e999", "{\"text\": \"\\ud800\"}".encode()])
def test_raw_garbage(server, raw):
    for path, _ in ENDPOINTS:
        r = httpx.post(server + path, content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, raw, r.text)
    assert_idle(server)
