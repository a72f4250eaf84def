"""Scale-out: an agent workload over 1, 2 and 4 engines, with and without a shared
Redis tier, all on loopback.

Each conversation reads a held-out context (~1K tokens of standard-library
source), then asks scripted follow-up questions in turns; each turn's prompt is
the context and every question so far, so turn k extends turn k-1's prompt. A
load balancer without affinity sends turn k of conversation c to engine
(c + k) % E: without a shared tier, a turn on an engine that has not seen the
conversation prefills it again; with one, that engine loads the chunks another
engine wrote through. Conversations run concurrently. Reported per system:
requests/s, TTFT p50/p99, end-to-end latency, the share of prompt tokens served
from the store and from any cache, Redis bytes moved, and quality: each greedy
answer against the one engine run without a store (identical answers, and
agreeing tokens).

With `--family` the conversations are agent hand-offs in the default model's
family (scripts/make_finetunes.py; profiles are made first if missing, as
bench_cross_model.py does): the default model reads a held-out context and
answers, then each fine-tune answers its own question on the same context, each
turn on the next engine, so a receiver reuses the sender's KV (DroidSpeak) from
its own tree or, on another engine, from the shared tier. Quality there is
against one engine without cross-model reuse or a store (every model's full
prefill). Results go to bench_scaleout_family.json.

    python benchmark/bench_scaleout.py [--conversations 12] [--turns 4] [--quick]
    python benchmark/bench_scaleout.py --family [--contexts 12]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import httpx

from bench_serving import free_port, start_http, start_redis
from common import percentile, print_table, stdlib_texts, write_json

QUESTIONS = ["\n\nQuestion: what does the code above do? Answer briefly.\nAnswer:",
             "\n\nQuestion: which function above is the most important, and why?\nAnswer:",
             "\n\nQuestion: name one way the code above could fail.\nAnswer:",
             "\n\nQuestion: how would you test the code above?\nAnswer:",
             "\n\nQuestion: summarise the code above in one sentence.\nAnswer:",
             "\n\nQuestion: what would you rename above, and to what?\nAnswer:"]


Turn = tuple  # (model name or None for the root, prompt)


def make_conversations(num: int, turns: int, context_chars: int, seed: int = 0) -> list[list[Turn]]:
    """Each conversation: its turns (context, then the questions so far), on the root model."""
    rng = random.Random(seed)
    texts = stdlib_texts(min_chars=context_chars + 200)
    out = []
    for c in range(num):
        text = texts[(c * 7) % len(texts)]
        start = rng.randrange(0, max(1, len(text) - context_chars))
        prompt, prompts = text[start:start + context_chars], []
        for k in range(turns):
            prompt += QUESTIONS[(c + k) % len(QUESTIONS)]
            prompts.append((None, prompt))
        out.append(prompts)
    return out


def family_conversations(args) -> tuple[list[list[Turn]], list[str]]:
    """Hand-offs over held-out contexts: the root answers, then each receiver; and
    the engine flags that host the family with its profiles."""
    from bench_cross_model import build_handoffs, load_family, model_flags
    from droidspeak.tokenizer.tokenizer import load_tokenizer
    family = load_family(args)
    if family is None:
        raise SystemExit(1)
    root_path, root, names, profiles = family
    handoffs = build_handoffs(load_tokenizer(root_path), args.contexts, args.context_tokens, args.seed, 0)
    models = [root, *args.receivers]
    conversations = [[(m, h["context"] + q) for m, q in zip(models, h["questions"])] for h in handoffs]
    return conversations, [*model_flags(names), "--cross-model-profiles", profiles]


def start_engines(count: int, redis_url: str | None, args, extra: list[str]) -> list[tuple[subprocess.Popen, str]]:
    threads = max(1, (os.cpu_count() or 1) // count)
    engines = []
    for _ in range(count):
        port = free_port()
        cmd = [sys.executable, "-m", "droidspeak.launch_server", "--port", str(port), "--dtype", args.dtype,
               "--num-threads", str(threads), "--max-total-tokens", str(args.max_total_tokens),
               "--max-requests-per-client", "0", *extra]
        if redis_url is not None:
            cmd += ["--kv-store", f"ram,{redis_url}", "--kv-store-write", "through"]
        engines.append(start_http(cmd, port))
    return engines


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


async def one_turn(client: httpx.AsyncClient, url: str, turn: Turn, max_new: int) -> dict:
    model, prompt = turn
    body = {"text": prompt, "stream": True, "wait_for_kv_store": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new}}
    if model is not None:
        body["model"] = model
    start = time.perf_counter()
    first, last = None, None
    async with client.stream("POST", url + "/generate", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                first = first or time.perf_counter()
                last = json.loads(line[6:])
    meta = last["meta_info"]
    return {"ttft": first - start, "e2e": time.perf_counter() - start, "output_ids": last["output_ids"],
            "prompt_tokens": meta["prompt_tokens"], "cached": meta["cached_tokens"],
            "store": meta.get("kv_store_cached_tokens", 0), "cross": meta.get("cross_model_cached_tokens", 0)}


async def run_workload(urls: list[str], conversations: list[list[Turn]], max_new: int) -> tuple[dict, list]:
    """Every conversation concurrently, its turns in order, turn k of conversation c on
    engine (c + k) % len(urls); returns the summary and every turn's result."""
    results: list[list[dict | None]] = [[None] * len(turns) for turns in conversations]

    async def conversation(client, c: int) -> None:
        for k, turn in enumerate(conversations[c]):
            results[c][k] = await one_turn(client, urls[(c + k) % len(urls)], turn, max_new)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(conversation(client, c) for c in range(len(conversations))))
        wall = time.perf_counter() - start
    flat = [r for turns in results for r in turns]
    later = [r for turns in results for r in turns[1:]]  # turns after the first: a context to reuse
    prompt_tokens = sum(r["prompt_tokens"] for r in later)
    return {"requests": len(flat), "wall_s": wall, "req_s": len(flat) / wall,
            "ttft_p50_ms": percentile([r["ttft"] for r in flat], 0.5) * 1e3,
            "ttft_p99_ms": percentile([r["ttft"] for r in flat], 0.99) * 1e3,
            "e2e_p50_s": percentile([r["e2e"] for r in flat], 0.5),
            "e2e_p99_s": percentile([r["e2e"] for r in flat], 0.99),
            "later_turns_cached_share": sum(r["cached"] for r in later) / prompt_tokens,
            "later_turns_store_share": sum(r["store"] for r in later) / prompt_tokens,
            "later_turns_cross_model_share": sum(r["cross"] for r in later) / prompt_tokens}, results


STORE_COUNTERS = ("chunks_written", "chunks_dropped", "chunks_loaded", "chunks_recompute_chosen")


def store_stats(urls: list[str]) -> dict:
    """Bytes every engine read from and wrote to the Redis tier, and the store's
    chunk counters summed over the engines."""
    out = dict.fromkeys(("redis_bytes_read", "redis_bytes_written", *STORE_COUNTERS), 0)
    for url in urls:
        stats = httpx.get(url + "/get_server_info", timeout=30).json().get("kv_store_stats") or {}
        for key in STORE_COUNTERS:
            out[key] += stats.get(key, 0)
        for tier in stats.get("tiers", []):
            if tier["tier"].startswith("redis"):
                out["redis_bytes_read"] += tier["bytes_read"]
                out["redis_bytes_written"] += tier["bytes_written"]
    return out


def agreement(results: list, reference: list) -> dict:
    """Answers identical to the reference run's, and the share of agreeing tokens."""
    same = tokens = agree = 0
    for turns, ref_turns in zip(results, reference):
        for r, ref in zip(turns, ref_turns):
            a, b = r["output_ids"], ref["output_ids"]
            same += a == b
            tokens += max(len(a), len(b))
            agree += sum(x == y for x, y in zip(a, b))
    n = sum(len(t) for t in results)
    return {"identical_answers": same / n, "agreeing_tokens": agree / max(tokens, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--context-chars", type=int, default=4000, help="about 1K tokens of source")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--engines", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-total-tokens", type=int, default=60000)
    parser.add_argument("--quick", action="store_true", help="4 conversations of 3 turns, 1 and 2 engines")
    parser.add_argument("--family", action="store_true", help="hand-offs between the default model's fine-tunes")
    parser.add_argument("--contexts", type=int, default=12, help="with --family: held-out contexts")
    parser.add_argument("--context-tokens", type=int, default=1024, help="with --family")
    from bench_cross_model import add_family_args
    add_family_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.turns, args.engines, args.contexts = 4, 3, [1, 2], 4
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server; `make redis`)")
    if args.family:
        conversations, extra = family_conversations(args)
        # the reference: every model's own full prefill, one engine, no store
        systems = [(1, False, ["--disable-cross-model"])]
    else:
        conversations, extra = make_conversations(args.conversations, args.turns, args.context_chars), []
        systems = []
    systems += [(count, shared, []) for count in args.engines for shared in (False, True)]
    rows, reference = [], None
    for count, shared, flags in systems:
        redis_proc, redis_url = start_redis() if shared else (None, None)
        engines = start_engines(count, redis_url, args, extra + flags)
        urls = [url for _, url in engines]
        label = f"{count} engine(s), {'shared Redis tier' if shared else 'no shared tier'}{' '.join(['', *flags])}"
        try:
            print(label + " ...", flush=True)
            summary, results = asyncio.run(run_workload(urls, conversations, args.max_new_tokens))
            if shared:
                summary.update(store_stats(urls))
        finally:
            stop([p for p, _ in engines] + ([redis_proc] if redis_proc else []))
        if reference is None:
            reference = results  # the first system: one engine, no store
        row = {"engines": count, "shared_tier": shared, "flags": flags, **summary, **agreement(results, reference)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, ["engines", "shared_tier", "flags", "req_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_s",
                       "later_turns_cached_share", "later_turns_store_share", "identical_answers"])
    shape = ({"contexts": len(conversations), "context_tokens": args.context_tokens, "receivers": args.receivers,
              "turns": 1 + len(args.receivers)} if args.family else
             {"conversations": args.conversations, "turns": args.turns, "context_chars": args.context_chars})
    write_json("bench_scaleout_family" if args.family else "bench_scaleout", {
        "model": "SmolLM2-135M-Instruct" + (f" and its fine-tunes {', '.join(args.receivers)}" if args.family else ""),
        "dtype": args.dtype, **shape, "max_new_tokens": args.max_new_tokens,
        "routing": "turn k of conversation c on engine (c + k) % E (no affinity)",
        "threads_per_engine": {str(c): max(1, (os.cpu_count() or 1) // c) for c in args.engines},
        "baseline": ("the same engines without a shared tier; quality against 1 engine with every model's own "
                     "full prefill (--disable-cross-model, no store)") if args.family else
                    "the same engines without a shared tier; quality against 1 engine without a store",
        "rows": rows})


if __name__ == "__main__":
    main()
