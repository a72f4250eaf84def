"""The real HTTP server on a loopback port, driven with httpx and the openai client."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from helpers import build_tiny_model

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, *extra: str):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "droidspeak.launch_server", "--model-path", model_path, "--port", str(port),
         "--dtype", "float32", "--max-total-tokens", "4096", "--served-model-name", "tiny", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not come up")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = build_tiny_model(str(tmp_path_factory.mktemp("srv")), "llama")
    proc, url = start_server(path)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0  # clean shutdown on SIGTERM


def load(url):
    return httpx.get(url + "/get_load").json()[0]


def assert_idle(url):
    """Nothing running or waiting and no KV held outside the evictable cache."""
    for _ in range(50):
        info = load(url)
        if info["num_reqs"] == 0 and info["num_waiting_reqs"] == 0 and info["num_tokens"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"server not idle: {info}")


def test_generate_single_batch_and_ids(server):
    one = httpx.post(server + "/generate", json={"text": "The quick brown fox", "sampling_params": GREEDY}).json()
    assert len(one["output_ids"]) == 8 and one["meta_info"]["finish_reason"]["type"] == "length"
    batch = httpx.post(server + "/generate", json={"text": ["The quick brown fox", "def add"],
                                                   "sampling_params": GREEDY}).json()
    assert isinstance(batch, list) and batch[0]["output_ids"] == one["output_ids"]
    ids = httpx.post(server + "/tokenize", json={"prompt": "The quick brown fox"}).json()["tokens"]
    by_ids = httpx.post(server + "/generate", json={"input_ids": ids, "sampling_params": GREEDY}).json()
    assert by_ids["output_ids"] == one["output_ids"]
    assert by_ids["meta_info"]["cached_tokens"] == len(ids) - 1
    text = httpx.post(server + "/detokenize", json={"tokens": one["output_ids"]}).json()["text"]
    assert text == one["text"]


def test_generate_stream_sse(server):
    with httpx.stream("POST", server + "/generate",
                      json={"text": "Radix trees", "sampling_params": GREEDY, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert [len(c["output_ids"]) for c in chunks] == list(range(1, 9))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    ref = httpx.post(server + "/generate", json={"text": "Radix trees", "sampling_params": GREEDY}).json()
    assert chunks[-1]["text"] == ref["text"]


def test_logprobs_and_n(server):
    out = httpx.post(server + "/generate", json={
        "text": "Caching keys", "sampling_params": {"max_new_tokens": 3, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
        "return_text_in_logprobs": True}).json()
    meta = out["meta_info"]
    assert meta["input_token_logprobs"][0][0] is None
    assert len(meta["output_token_logprobs"]) == 3 and len(meta["output_top_logprobs"][0]) == 2
    many = httpx.post(server + "/generate", json={"text": "x", "sampling_params": {
        "n": 3, "max_new_tokens": 4, "temperature": 1.0, "sampling_seed": 1}}).json()
    assert len(many) == 3


def test_info_endpoints(server):
    for path in ("/get_model_info", "/model_info", "/models/tiny/model_info"):
        info = httpx.get(server + path).json()
        assert info["is_generation"] and info["served_model_name"] == "tiny"
    for path in ("/get_server_info", "/server_info"):
        info = httpx.get(server + path).json()
        assert info["max_total_num_tokens"] == 4096 and info["schedule_policy"] == "lpm"
    assert httpx.get(server + "/health_generate").status_code == 200
    assert httpx.post(server + "/flush_cache").status_code == 200
    assert httpx.get(server + "/v1/models").json()["data"][0]["id"] == "tiny"
    r = httpx.get(server + "/models/other/model_info")
    assert r.status_code == 404 and "tiny" in r.json()["error"]["message"]
    per_model = httpx.post(server + "/models/tiny/generate", json={"text": "x", "sampling_params": GREEDY})
    assert per_model.status_code == 200


def test_openai_client(server):
    import openai
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    c = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens <= 6
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 0
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=6, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == chat.usage.prompt_tokens - 1
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == chat.choices[0].message.content and usage.completion_tokens == chat.usage.completion_tokens
    lp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                        temperature=0, logprobs=True, top_logprobs=2, n=2, stop=["never"])
    assert len(lp.choices) == 2 and len(lp.choices[0].logprobs.content[0].top_logprobs) == 2
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=-3)


@pytest.mark.parametrize("body,field", [
    ('{bad json', None),
    ('[1, 2]', None),
    ('{"text": 5}', "text"),
    ('{"text": "x", "sampling_params": {"top_p": 7}}', "top_p"),
    ('{"text": "x", "sampling_params": {"max_new_tokens": "many"}}', "max_new_tokens"),
    ('{"text": "x", "sampling_params": {"unknown_knob": 1}}', "unknown_knob"),
    ('{"input_ids": [1, 99999999]}', "input_ids"),
    ('{"text": "x", "sampling_params": {"max_new_tokens": 100000}}', "max_new_tokens"),
    ('{}', "text"),
])
def test_bad_input_is_400_naming_the_field(server, body, field):
    r = httpx.post(server + "/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if field:
        assert err["param"] == field and field in err["message"]
    assert httpx.get(server + "/health").status_code == 200
    assert_idle(server)


def test_dropped_client_aborts_and_frees_kv(server):
    body = {"text": "The quick brown fox", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    # streaming: read one event, then hang up
    with httpx.stream("POST", server + "/generate", json=dict(body, stream=True)) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["meta_info"]["finish_reason"] is None
    assert_idle(server)
    # non-streaming: the client times out and goes away mid-generation
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/generate", json=body, timeout=0.3)
    assert_idle(server)


def test_http_loop_stays_responsive_during_generation(server):
    body = {"text": "The quick brown fox", "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True}}
    worker = threading.Thread(target=lambda: httpx.post(server + "/generate", json=body, timeout=120))
    worker.start()
    time.sleep(0.3)
    start = time.perf_counter()
    assert httpx.get(server + "/get_load").json()[0]["num_reqs"] == 1
    latency = time.perf_counter() - start
    worker.join()
    assert latency < 5.0  # a loose bound: the loop answered while the model computed


def test_api_key(tmp_path):
    path = build_tiny_model(str(tmp_path), "llama", num_layers=1)
    proc, url = start_server(path, "--api-key", "sekret")
    try:
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/get_model_info").status_code == 401
        ok = httpx.get(url + "/get_model_info", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_metrics(server):
    httpx.post(server + "/generate", json={"text": "metrics please", "sampling_params": GREEDY})
    text = httpx.get(server + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['droidspeak_generation_tokens_total{model_name="tiny"}'] >= 8
    assert values['droidspeak_prompt_tokens_total{model_name="tiny"}'] > 0
    assert values['droidspeak_time_to_first_token_seconds_count{model_name="tiny"}'] >= 1
    assert values['droidspeak_inter_token_latency_seconds_count{model_name="tiny"}'] >= 1
    assert values['droidspeak_num_queue_reqs{model_name="tiny"}'] == 0
    assert 0 <= values['droidspeak_kv_pool_usage{model_name="tiny"}'] <= 1
    assert values['droidspeak_kv_pool_tokens{model_name="tiny"}'] == 4096
    assert any(k.startswith("droidspeak_requests_total{") and 'finish_reason="length"' in k for k in values)


def test_abort_request_by_rid(server):
    body = {"text": "The quick brown fox", "rid": "abort-me", "stream": True,
            "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True}}
    last = None
    with httpx.stream("POST", server + "/generate", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                last = json.loads(line[6:])
                if last["meta_info"]["completion_tokens"] == 2:
                    assert httpx.post(server + "/abort_request", json={"rid": "abort-me"}).status_code == 200
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 1900
    assert_idle(server)


def test_engine_is_built_and_run_on_the_scheduler_thread(tiny_llama):
    # every torch op of the served engine runs on one thread (a second OpenMP team
    # on the main thread made each decode step 1.6x slower); a failed build is
    # raised to the launcher instead of leaving a server without an engine
    from droidspeak import Engine
    from droidspeak.errors import ModelNotFoundError
    from droidspeak.server.async_engine import AsyncEngine
    built_on = []

    def factory():
        built_on.append(threading.current_thread().name)
        return Engine(tiny_llama, dtype="float32", max_total_tokens=1024)
    aengine = AsyncEngine(factory=factory)
    aengine.start()
    try:
        assert built_on == ["droidspeak-scheduler"] and aengine.engine.model_names
    finally:
        aengine.shutdown()
    failing = AsyncEngine(factory=lambda: Engine("/nonexistent/model"))
    with pytest.raises(ModelNotFoundError):
        failing.start()
    with pytest.raises(ValueError):
        AsyncEngine()
