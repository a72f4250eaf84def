"""Overload and abuse against a real server (default model, loopback only).

A well-behaved client sends one short streaming request per second and records
its time to first token. Phases, each `--phase-s` seconds: unloaded (the
baseline, same run), then hostile clients in turn: fan-out requests at the
limits (prompts x n at max_fanout_per_request), a flood of concurrent requests
past the queue limit, streams dropped after a few tokens, and bodies over the
size cap. Reported per phase: the well-behaved client's TTFT p50/p99 against the
unloaded run, what it was refused, the hostile requests answered by status, the
server's rejections and aborts by reason (from /metrics), and at the end the
leak audit: nothing running or queued, no KV held outside the prefix cache, and
after /flush_cache every slot free.

    python benchmark/bench_abuse.py [--phase-s 15] [--quick]
    python benchmark/report.py                 # the docs table from the results file
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import signal
import sys
import time

import httpx

from bench_serving import free_port, start_http
from common import percentile, print_table, write_json

MAX_QUEUED = 192
MAX_FANOUT = 128                      # two prompts x n = 64: the fan-out attack sits at the limit,
                                      # which is also the per-client limit ((64 rows + 192) / 2)
HOSTILE_ADDRESS = "127.0.0.2"         # the hostile client's own loopback address (a client of its own)
BODY_CAP_MB = 4
GOOD_PROMPT = ("You are a helpful assistant. Summarize in one sentence why a shared cache of "
               "prompt prefixes makes a serving engine faster for agents that reread one document.")
GOOD_PARAMS = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
FLOOD_WORKERS = (64 + MAX_QUEUED) // 2 + 32  # concurrent flood requests: 32 past the client's share
DROP_WORKERS = 16                     # concurrent streams dropped after a few tokens
HOSTILE_PAUSE_S = 0.1                 # a refused hostile worker tries again after this (not Retry-After's 1 s)
RAMP_S = 1.0
HOSTILE_NICE = 10


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def counted(values: dict[str, float], family: str) -> dict[str, float]:
    """{label value: count} of a one-label counter family."""
    prefix = f"droidspeak_{family}_total{{"
    return {k[len(prefix):].split('"')[1]: v for k, v in values.items() if k.startswith(prefix)}


def delta(after: dict, before: dict) -> dict:
    return {k: int(v - before.get(k, 0)) for k, v in after.items() if v - before.get(k, 0)}


async def good_client(url: str, seconds: float) -> dict:
    """One short streaming request per second; TTFT of each, its mean time between
    tokens (under load: the running batch's decode step), and what was refused."""
    ttfts, itls, refused = [], [], collections.Counter()
    async with httpx.AsyncClient(timeout=120) as client:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            tick = time.perf_counter()
            body = {"text": GOOD_PROMPT, "stream": True, "sampling_params": GOOD_PARAMS}
            async with client.stream("POST", url + "/generate", json=body) as r:
                if r.status_code != 200:
                    refused[r.status_code] += 1
                    await r.aread()
                else:
                    times = []
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            times.append(time.perf_counter())
                    ttfts.append(times[0] - tick)
                    itls.append((times[-1] - times[0]) / (len(times) - 1))
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - tick)))
    return {"ttfts": ttfts, "itls": itls, "refused": dict(refused)}


async def fanout_attack(url: str, stop: asyncio.Event, statuses: collections.Counter, limits: dict) -> None:
    """Requests at the fan-out limits: two prompts x n, max_fanout sub-requests each,
    one after another."""
    n = min(limits["max_n"], limits["max_fanout_per_request"] // 2)
    body = {"text": ["Write a long story about a lighthouse.", "List every prime number you know."],
            "sampling_params": {"n": n, "max_new_tokens": 256, "ignore_eos": True, "temperature": 0.8}}
    async with hostile_client() as client:
        while not stop.is_set():
            r = await client.post(url + "/generate", json=body)
            statuses[r.status_code] += 1


def hostile_client(connections: int = 1) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=HOSTILE_ADDRESS,
                                         limits=httpx.Limits(max_connections=connections))
    return httpx.AsyncClient(timeout=600, transport=transport)


async def flood_attack(url: str, stop: asyncio.Event, statuses: collections.Counter, limits: dict) -> None:
    """Many concurrent small requests, more than the queue holds; refused ones retry
    at once (a hostile client ignores Retry-After)."""
    body = {"text": "Tell me about the sea.", "sampling_params": {"max_new_tokens": 32, "ignore_eos": True}}

    async def worker(client):
        while not stop.is_set():
            r = await client.post(url + "/generate", json=body)
            statuses[r.status_code] += 1
            if r.status_code != 200:
                await asyncio.sleep(HOSTILE_PAUSE_S)
    async with hostile_client(FLOOD_WORKERS) as client:
        await asyncio.gather(*(worker(client) for _ in range(FLOOD_WORKERS)))


async def drop_attack(url: str, stop: asyncio.Event, statuses: collections.Counter, limits: dict) -> None:
    """Long streams read for three tokens, then the connection is dropped."""
    body = {"text": "Count slowly from one to a thousand.", "stream": True,
            "sampling_params": {"max_new_tokens": 1024, "ignore_eos": True}}

    async def worker():
        while not stop.is_set():
            async with hostile_client() as client:  # a connection of its own, closed on exit
                async with client.stream("POST", url + "/generate", json=body) as r:
                    statuses[r.status_code] += 1
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data: {")
                        if seen == 3:
                            break
    await asyncio.gather(*(worker() for _ in range(DROP_WORKERS)))


async def body_attack(url: str, stop: asyncio.Event, statuses: collections.Counter, limits: dict) -> None:
    """Bodies over the cap: a declared Content-Length past it, then a chunked body
    that passes it, in turn."""
    host, port = url.removeprefix("http://").split(":")
    size = (BODY_CAP_MB + 1) << 20
    payload = b'{"text": "' + b"a" * (size - 12) + b'"}'
    declared = True
    while not stop.is_set():
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=(HOSTILE_ADDRESS, 0))
        try:
            if declared:
                head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
                writer.write(head.encode())
            else:
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(payload), 1 << 20):
                part = payload[i:i + (1 << 20)]
                writer.write(part if declared else f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 30)
            statuses[int(status_line.split()[1]) if status_line else "no answer"] += 1
        except (ConnectionError, asyncio.TimeoutError, IndexError, ValueError):
            # The server answered and closed before the whole body was written.
            statuses["closed while sending"] += 1
        finally:
            writer.close()
        declared = not declared
        await asyncio.sleep(HOSTILE_PAUSE_S)


ATTACKS = {"fan-out at the limits": fanout_attack, "flood past the queue": flood_attack,
           "dropped streams": drop_attack, "bodies over the cap": body_attack}


def run_attack(name: str, url: str, seconds: float, limits: dict, conn) -> None:
    """A hostile client in a process of its own (so the well-behaved client's own
    event loop is not the one it loads), for `seconds`; sends back its answers. It
    runs at a lower CPU priority (HOSTILE_NICE): a real attacker's CPU is its own,
    and here a process contending for one of the server's two cores slows every
    parallel region of the forward to that core's share."""
    os.nice(HOSTILE_NICE)

    async def attack() -> collections.Counter:
        stop, statuses = asyncio.Event(), collections.Counter()
        task = asyncio.ensure_future(ATTACKS[name](url, stop, statuses, limits))
        await asyncio.sleep(seconds)
        stop.set()
        task.cancel()  # drops whatever it still has open
        await asyncio.gather(task, return_exceptions=True)
        return statuses
    conn.send({str(k): v for k, v in asyncio.run(attack()).items()})


def phase(url: str, seconds: float, attack: str | None, limits: dict) -> dict:
    hostile = None
    if attack is not None:
        receive, conn = multiprocessing.Pipe(duplex=False)
        hostile = multiprocessing.get_context("spawn").Process(
            target=run_attack, args=(attack, url, seconds + RAMP_S, limits, conn))
        hostile.start()
        time.sleep(RAMP_S)  # the attack is under way before the first measurement
    good = asyncio.run(good_client(url, seconds))
    statuses = {}
    if hostile is not None:
        statuses = receive.recv()
        hostile.join(timeout=60)
    return dict(good, hostile=statuses)


def wait_idle(url: str, timeout_s: float = 60) -> tuple[dict, float]:
    start = time.perf_counter()
    while True:
        load = httpx.get(url + "/get_load", timeout=30).json()[0]
        if (load["num_reqs"], load["num_waiting_reqs"], load["num_tokens"]) == (0, 0, 0):
            return load, time.perf_counter() - start
        if time.perf_counter() - start > timeout_s:
            return load, time.perf_counter() - start
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-s", type=float, default=15.0, help="seconds per phase (default: 15)")
    parser.add_argument("--quick", action="store_true", help="5-second phases (a smoke run)")
    args = parser.parse_args()
    seconds = 5.0 if args.quick else args.phase_s
    port = free_port()
    cmd = [sys.executable, "-m", "droidspeak.launch_server", "--port", str(port),
           "--max-queued-requests", str(MAX_QUEUED), "--max-fanout-per-request", str(MAX_FANOUT),
           "--max-request-body-mb", str(BODY_CAP_MB)]
    proc, url = start_http(cmd, port)
    try:
        info = httpx.get(url + "/server_info", timeout=30).json()
        limits = {k: info[k] for k in ("max_n", "max_prompts_per_request", "max_fanout_per_request",
                                       "max_running_requests", "max_queued_requests", "max_requests_per_client",
                                       "reserved_running_requests")}
        print("limits:", limits, flush=True)
        asyncio.run(good_client(url, 2.0))  # warm-up
        rows, phases = [], {}
        unloaded = None
        for name, attack in [("unloaded", None), *((a, a) for a in ATTACKS)]:
            before = metrics(url)
            result = phase(url, seconds, attack, limits)
            load, idle_s = wait_idle(url)
            after = metrics(url)
            result.update(rejected=delta(counted(after, "rejected_requests"), counted(before, "rejected_requests")),
                          aborted=delta(counted(after, "aborted_requests"), counted(before, "aborted_requests")),
                          idle_after_s=round(idle_s, 2), load_after=load)
            phases[name] = result
            p50, p99 = percentile(result["ttfts"], 0.5) * 1e3, percentile(result["ttfts"], 0.99) * 1e3
            if unloaded is None:
                unloaded = (p50, p99)
            rows.append({"phase": name, "good requests": len(result["ttfts"]),
                         "good refused": sum(result["refused"].values()),
                         "ttft p50 ms": p50, "ttft p99 ms": p99, "p99 / unloaded": p99 / unloaded[1],
                         "itl p50 ms": percentile(result["itls"], 0.5) * 1e3,
                         "hostile answers": json.dumps(result["hostile"]),
                         "rejected": json.dumps(result["rejected"]), "aborted": json.dumps(result["aborted"]),
                         "idle after s": result["idle_after_s"]})
            print(rows[-1], flush=True)
        flushed = httpx.post(url + "/flush_cache", timeout=30).status_code == 200
        usage = metrics(url)['droidspeak_kv_pool_usage{model_name="' + info["served_model_name"] + '"}']
        audit = {"idle": all(p["load_after"]["num_tokens"] == 0 and p["load_after"]["num_reqs"] == 0
                             and p["load_after"]["num_waiting_reqs"] == 0 for p in phases.values()),
                 "flushed": flushed, "kv_pool_usage_after_flush": usage}
        print_table(rows, ["phase", "good requests", "good refused", "ttft p50 ms", "ttft p99 ms", "p99 / unloaded",
                           "itl p50 ms", "rejected", "aborted", "idle after s"])
        print("leak audit:", audit)
        write_json("bench_abuse", {"model": info["model_path"], "dtype": info["dtype"], "phase_s": seconds,
                                   "limits": limits, "rows": rows, "phases": phases, "leak_audit": audit})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
