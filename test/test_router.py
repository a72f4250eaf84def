"""Two droidspeak workers behind sglang-router (127.0.0.1 only)."""
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from helpers import build_tiny_model
from test_kvstore import redis_server  # noqa: F401  (a fixture)
from test_server import free_port, start_server


def start_router(worker_urls: list[str], log) -> tuple[subprocess.Popen, str]:
    """sglang-router (cache-aware) over `worker_urls`, its output in the file `log`;
    returns once a request through it is answered (or after a minute)."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
             "--worker-urls", *worker_urls, "--policy", "cache_aware",
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.post(url + "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}},
                          timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return proc, url


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    path = build_tiny_model(str(tmp_path_factory.mktemp("router")), "llama")
    workers = [start_server(path) for _ in range(2)]
    log = tmp_path_factory.mktemp("router_log") / "router.log"
    proc, url = start_router([url for _, url in workers], log)
    yield url, log
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    for worker, _ in workers:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)


def test_requests_through_the_router(router):
    url, log = router
    out = httpx.post(url + "/generate", json={"text": "The quick brown fox",
                                              "sampling_params": {"max_new_tokens": 4, "temperature": 0}}).json()
    assert len(out["output_ids"]) == 4
    chat = httpx.post(url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    text = log.read_text()
    assert "Activated" in text and "registered tokenizer" in text
    warnings = [line for line in text.splitlines() if " WARN" in line or "ERROR" in line]
    assert not warnings, warnings


def test_cross_model_reuse_across_workers_over_a_shared_redis(tmp_path, redis_server):
    """Two family workers behind the router share one redis-server: a context model a
    read on worker A is reused by model b on worker B with b's profiled recompute;
    with Redis killed, both keep answering (recomputing what the store held)."""
    from helpers import derive_finetune
    from test_crossmodel import CONTEXT, NUM_LAYERS, QUESTIONS, write_profile
    redis_url, redis_proc = redis_server
    base = build_tiny_model(str(tmp_path / "base"), "llama", seed=0, num_layers=NUM_LAYERS)
    paths = {"base": base, "a": derive_finetune(base, str(tmp_path / "a"), seed=1, scale=0.2),
             "b": derive_finetune(base, str(tmp_path / "b"), seed=2, scale=0.2)}
    profiles = str(tmp_path / "profiles")
    os.makedirs(profiles)
    write_profile(profiles, paths, "a", "b", (2, 4))
    flags = ("--model", f"a={paths['a']}", "--model", f"b={paths['b']}", "--cross-model-profiles", profiles,
             "--kv-store", redis_url, "--kv-store-chunk-size", "16", "--kv-store-levels", "lossless",
             "--kv-store-load", "always", "--chunked-prefill-size", "-1", "--max-requests-per-client", "0")
    workers = [start_server(base, *flags) for _ in range(2)]
    (_, url_a), (_, url_b) = workers
    router, url = start_router([url_a, url_b], tmp_path / "router.log")
    params = {"temperature": 0, "max_new_tokens": 3}
    try:
        sender = httpx.post(url_a + "/generate", json={"text": CONTEXT + QUESTIONS[0], "model": "a",
                                                       "sampling_params": params, "wait_for_kv_store": True},
                            timeout=60)
        assert sender.status_code == 200
        receiver = httpx.post(url_b + "/generate", json={"text": CONTEXT + QUESTIONS[1], "model": "b",
                                                         "sampling_params": params}, timeout=60).json()
        meta = receiver["meta_info"]
        assert meta["kv_store_cached_tokens"] > 0 and meta["cross_model_cached_tokens"] > 0, meta
        pair = next(p for p in httpx.get(url_b + "/server_info").json()["cross_model_pairs"]
                    if (p["sender"], p["receiver"]) == ("a", "b"))
        assert pair["hits"] == 1 and pair["recompute_layers"] == [2, 4]
        redis_proc.kill()
        redis_proc.wait()
        for i, model in enumerate(["a", "b", "a", "b"]):
            r = httpx.post(url + "/generate", json={"text": f"{CONTEXT} after redis {i}", "model": model,
                                                    "sampling_params": params}, timeout=60)
            assert r.status_code == 200 and len(r.json()["output_ids"]) == 3
    finally:
        router.send_signal(signal.SIGINT)
        router.wait(timeout=30)
        for worker, _ in workers:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
