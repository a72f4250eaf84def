"""Two droidspeak workers behind sglang-router (127.0.0.1 only)."""
import signal
import subprocess
import sys
import time

import httpx
import pytest

from helpers import build_tiny_model
from test_server import free_port, start_server


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    path = build_tiny_model(str(tmp_path_factory.mktemp("router")), "llama")
    workers = [start_server(path) for _ in range(2)]
    port = free_port()
    log = tmp_path_factory.mktemp("router_log") / "router.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
             "--worker-urls", *[url for _, url in workers], "--policy", "cache_aware",
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
