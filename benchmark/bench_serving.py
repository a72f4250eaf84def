"""Online serving over the HTTP API: concurrency and request-rate sweeps with
streaming clients; TTFT, inter-token latency and end-to-end latency (p50/p99) and
throughput. Baseline in the same run: the same server with --max-running-requests 1
(one request at a time, as a server without continuous batching).
Default model, bf16, prompts of real text (stdlib source).

    python benchmark/bench_serving.py [--num-requests 32] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx

from common import percentile, print_table, stdlib_texts, write_json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if "--max-total-tokens" not in extra:
        extra = ["--max-total-tokens", "100000", *extra]
    return start_http([sys.executable, "-m", "droidspeak.launch_server", "--port", str(port), *extra], port)


def start_http(cmd: list[str], port: int) -> tuple[subprocess.Popen, str]:
    """Start a server process listening on `port`; return it once /health answers."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def start_redis(*extra: str) -> tuple[subprocess.Popen, str]:
    """A redis-server on a free loopback port, no persistence (`extra`: more of its
    flags); returns it with its URL once it answers a ping."""
    import redis
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}"
        except redis.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("redis-server did not start")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_new: int) -> dict:
    body = {"text": prompt, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}}
    start = time.perf_counter()
    token_times = []
    async with client.stream("POST", url + "/generate", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                token_times.append(time.perf_counter())
                last = json.loads(line[6:])
    end = time.perf_counter()
    n = last["meta_info"]["completion_tokens"]
    ttft = token_times[0] - start
    return {"ttft": ttft, "e2e": end - start, "tokens": n,
            "itl": (token_times[-1] - token_times[0]) / (len(token_times) - 1) if len(token_times) > 1 else 0.0}


async def run_load(url: str, prompts: list[tuple[str, int]], concurrency: int | None, rate: float | None) -> dict:
    """Closed loop with `concurrency` clients, or open loop with Poisson arrivals at `rate` req/s."""
    results = []
    limits = httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        if concurrency is not None:
            queue = list(prompts)

            async def worker():
                while queue:
                    prompt, n = queue.pop()
                    results.append(await one_request(client, url, prompt, n))
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = random.Random(0)
            tasks = []
            for prompt, n in prompts:
                tasks.append(asyncio.create_task(one_request(client, url, prompt, n)))
                await asyncio.sleep(rng.expovariate(rate))
            results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results), "wall_s": wall, "req_s": len(results) / wall, "out_tok_s": tokens / wall,
        "ttft_p50_ms": percentile([r["ttft"] for r in results], 0.5) * 1e3,
        "ttft_p99_ms": percentile([r["ttft"] for r in results], 0.99) * 1e3,
        "itl_p50_ms": percentile([r["itl"] for r in results], 0.5) * 1e3,
        "itl_p99_ms": percentile([r["itl"] for r in results], 0.99) * 1e3,
        "e2e_p50_s": percentile([r["e2e"] for r in results], 0.5),
        "e2e_p99_s": percentile([r["e2e"] for r in results], 0.99),
    }


def make_prompts(num: int, seed: int = 0) -> list[tuple[str, int]]:
    """Prompts of 600-1800 characters (~150-450 tokens) of real text, 32-96 new tokens."""
    rng = random.Random(seed)
    texts = stdlib_texts()
    out = []
    for i in range(num):
        text = texts[i % len(texts)]
        start = rng.randrange(0, max(1, len(text) - 2000))
        out.append((text[start:start + rng.randint(600, 1800)], rng.randint(32, 96)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    prompts = make_prompts(args.num_requests)
    concurrencies = [1, 8] if args.quick else [1, 4, 16]
    rates = [2.0] if args.quick else [1.0, 4.0]
    rows = []
    for system, extra in (("droidspeak", []), ("serial baseline", ["--max-running-requests", "1"])):
        proc, url = start_server(extra)
        try:
            asyncio.run(run_load(url, prompts[:2], 1, None))  # warm-up
            for c in concurrencies:
                httpx.post(url + "/flush_cache")
                rows.append({"system": system, "load": f"concurrency {c}", **asyncio.run(run_load(url, prompts, c, None))})
                print(rows[-1], flush=True)
            for rate in rates:
                httpx.post(url + "/flush_cache")
                rows.append({"system": system, "load": f"{rate:g} req/s", **asyncio.run(run_load(url, prompts, None, rate))})
                print(rows[-1], flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print_table(rows, ["system", "load", "req_s", "out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                       "itl_p99_ms", "e2e_p50_s", "e2e_p99_s"])
    write_json("bench_serving", {"model": "SmolLM2-135M-Instruct", "dtype": "auto (bfloat16 here)",
                                 "num_requests": args.num_requests, "rows": rows,
                                 "baseline": "same server, --max-running-requests 1"})


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
