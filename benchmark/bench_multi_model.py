"""A mixed workload over four fine-tunes of the default model (code, docs, math and
the code LoRA adapter from scripts/make_finetunes.py): one co-batching droidspeak
server for the family vs. the same models served one server process per model, in
the same run, with the same streaming clients. Reports throughput, TTFT p50/p99 and
the resident memory of the server processes.

    python scripts/make_finetunes.py          # once
    python benchmark/bench_multi_model.py [--num-requests 32] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal

import httpx
import psutil

from bench_serving import make_prompts, one_request, start_server
from common import percentile, print_table, write_json

FULL = ("code", "docs", "math")
LORA = "code-lora"


def rss_mib(procs) -> float:
    total = 0
    for p in procs:
        proc = psutil.Process(p.pid)
        total += proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    return total / 2**20


async def mixed_load(routes: dict[str, tuple[str, str | None]], jobs, concurrency: int) -> dict:
    """routes: model -> (server url, model field); jobs: (model, prompt, new tokens)."""
    results = []
    queue = list(jobs)
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=256)) as client:
        async def worker():
            while queue:
                model, prompt, n = queue.pop(0)
                url, field = routes[model]
                base = f"{url}/models/{field}" if field else url
                results.append(await one_request(client, base, prompt, n))
        start = asyncio.get_running_loop().time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = asyncio.get_running_loop().time() - start
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": wall, "req_s": len(results) / wall, "out_tok_s": tokens / wall,
            "ttft_p50_ms": percentile([r["ttft"] for r in results], 0.5) * 1e3,
            "ttft_p99_ms": percentile([r["ttft"] for r in results], 0.99) * 1e3,
            "e2e_p50_s": percentile([r["e2e"] for r in results], 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--finetunes", default=None, help="default: $DROIDSPEAK_CACHE/finetunes")
    args = parser.parse_args()
    from droidspeak.models.default_model import cache_dir, prepare_default_model
    root = args.finetunes or os.path.join(cache_dir(), "finetunes")
    for name in FULL + (LORA,):
        if not os.path.isfile(os.path.join(root, name, "droidspeak_finetune.json")):
            raise SystemExit(f"missing fine-tune {name} under {root}: run scripts/make_finetunes.py first")
    base = prepare_default_model()
    models = list(FULL) + [LORA]
    rng = random.Random(0)
    prompts = make_prompts(args.num_requests)
    jobs = [(models[i % len(models)], p, n) for i, (p, n) in enumerate(prompts)]
    rng.shuffle(jobs)
    common = ["--max-total-tokens", "40000"]
    rows = []

    # droidspeak: one server, one scheduler, co-batched family
    family_args = ["--model-path", base, *common, *[a for n in FULL for a in ("--model", f"{n}={root}/{n}")],
                   "--lora-paths", f"{LORA}={root}/{LORA}"]
    proc, url = start_server(family_args)
    try:
        asyncio.run(mixed_load({m: (url, m) for m in models}, jobs[:4], 4))  # warm-up
        httpx.post(url + "/flush_cache")
        stats = asyncio.run(mixed_load({m: (url, m) for m in models}, jobs, args.concurrency))
        rows.append({"system": "droidspeak, one co-batching engine", **stats, "rss_mib": rss_mib([proc])})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(rows[-1], flush=True)

    # baseline: one server process per model (1 torch thread each on the shared cores)
    procs, routes = [], {}
    try:
        for name in FULL:
            p, u = start_server(["--model-path", f"{root}/{name}", "--num-threads", "1", *common])
            procs.append(p)
            routes[name] = (u, None)
        p, u = start_server(["--model-path", base, "--num-threads", "1", *common,
                             "--lora-paths", f"{LORA}={root}/{LORA}"])
        procs.append(p)
        routes[LORA] = (u, LORA)
        asyncio.run(mixed_load(routes, jobs[:4], 4))
        stats = asyncio.run(mixed_load(routes, jobs, args.concurrency))
        rows.append({"system": "one engine per model (4 processes)", **stats, "rss_mib": rss_mib(procs)})
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
    print_table(rows, ["system", "requests", "req_s", "out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_s",
                       "rss_mib"])
    write_json("bench_multi_model", {"model": "SmolLM2-135M-Instruct fine-tunes: code, docs, math, code-lora",
                                     "concurrency": args.concurrency, "rows": rows,
                                     "baseline": "one droidspeak server per model, --num-threads 1 each"})


if __name__ == "__main__":
    main()
