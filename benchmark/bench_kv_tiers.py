"""The KV store's tiers on the default model: time to first token of a long
held-out context loaded from each tier (RAM, disk, Redis) at each CacheGen level,
against recomputing it in the same run; then TTFT under a bandwidth trace over a
rate-limited link for fixed levels, the adaptive streamer and recompute-only.

Each measurement prefills the context once (written through to the tier), drops
the engine's radix cache, and times the same prompt again, so the context comes
from the tier (or is recomputed) and only the question after it is prefilled.

    python benchmark/bench_kv_tiers.py [--context-tokens 4096] [--contexts 2] [--no-redis]
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

from bench_serving import start_redis
from common import RESULTS_DIR, print_table, write_json

SAMPLING = {"max_new_tokens": 1, "temperature": 0}
TRACE_MBPS = (2000, 400, 100, 40, 15, 5)


def contexts(tok, n: int, length: int) -> list[list[int]]:
    from droidspeak.crossmodel.calibration import build_items
    items = [i for i in build_items("evaluation", n, context_chars=length * 6) if i.domain != "math"][:n]
    out = []
    for item in items:
        ids = tok.encode(item.context + item.question, add_special_tokens=False)
        out.append(ids[:length + 32])  # the context, then a 32-token question over it
    return out


def make_engine(**kw):
    from droidspeak import Engine
    return Engine(None, max_total_tokens=kw.pop("max_total_tokens"), disable_cross_model=True,
                  chunked_prefill_size=-1, **kw)


def ttft(engine, ids) -> tuple[float, dict]:
    engine.flush_cache()
    start = time.perf_counter()
    out = engine.generate(input_ids=ids, sampling_params=SAMPLING)
    return time.perf_counter() - start, out["meta_info"]


def tier_rows(args, prompts, pool_tokens, recompute_s) -> list[dict]:
    rows = []
    redis = None if args.no_redis or shutil.which("redis-server") is None else start_redis("--maxmemory", "4gb")
    disk = tempfile.mkdtemp(prefix="ds-kv-disk-")
    specs = [("ram", "ram", lv) for lv in ("lossless", "high", "medium", "low")]
    specs += [("disk", f"disk:{disk}", "high")]
    if redis:
        specs += [("redis", redis[1], "high")]
    try:
        for tier, spec, level in specs:
            engine = make_engine(max_total_tokens=pool_tokens, kv_store=spec, kv_store_levels=level,
                                 kv_store_write="through", kv_store_load="always")
            times, loaded = [], []
            for ids in prompts:
                engine.generate(input_ids=ids, sampling_params=SAMPLING)  # computes and stores the context
                engine.offloader.flush(600)
                ttft(engine, ids)  # warm-up: the first decode of a level pays one-time costs
                t, meta = ttft(engine, ids)
                times.append(t)
                loaded.append(meta["kv_store_cached_tokens"])
            stats = engine.offloader.stats()
            stored = [t for t in stats["tiers"] if t["tier"] == tier][0]["bytes_written"]
            engine.shutdown()
            del engine
            gc.collect()
            mean = sum(times) / len(times)
            rows.append({"tier": tier, "level": level, "ttft_s": mean, "vs recompute": recompute_s / mean,
                         "tokens loaded": sum(loaded) / len(loaded),
                         "MB stored/ctx": stored / len(prompts) / 1e6})
            print(f"  {tier:5} {level:8} TTFT {mean:.3f} s ({recompute_s / mean:.2f}x), "
                  f"{rows[-1]['tokens loaded']:.0f} tokens loaded", flush=True)
    finally:
        if redis:
            redis[0].kill()
        shutil.rmtree(disk, ignore_errors=True)
    return rows


def trace_rows(args, prompts, pool_tokens, recompute_fn) -> list[dict]:
    """One engine stores each context at high, medium and low; a throttled link
    in front of its RAM tier plays remote storage at each bandwidth of the trace."""
    from droidspeak.kvstore.link import ThrottledTier
    engine = make_engine(max_total_tokens=pool_tokens, kv_store="ram", kv_store_levels="high,medium,low",
                         kv_store_write="through")
    for ids in prompts:
        engine.generate(input_ids=ids, sampling_params=SAMPLING)
    engine.offloader.flush(600)
    state = engine.offloader.store.states[0]
    link = ThrottledTier(state.tier, TRACE_MBPS[0] * 1e6, latency_s=0.002)
    state.tier = link
    offloader = engine.offloader
    target = args.ttft_target_ms / 1e3
    every = ("high", "medium", "low")
    modes = {"high": (("high",), False, None), "medium": (("medium",), False, None), "low": (("low",), False, None),
             "adaptive": (every, True, None), f"adaptive {args.ttft_target_ms:.0f}ms": (every, True, target)}
    rows = []
    for mbps in TRACE_MBPS:
        link.set_bandwidth(mbps * 1e6)
        row = {"MB/s": mbps}
        for mode, (levels, adaptive, ttft_target) in modes.items():
            offloader.levels, offloader.adaptive, offloader.ttft_target_s = levels, adaptive, ttft_target
            before = dict(offloader.level_counts)
            before_rc = offloader.counters["chunks_recompute_chosen"]
            times = [ttft(engine, ids)[0] for ids in prompts]
            row[mode] = sum(times) / len(times)
            if adaptive:
                row[f"{mode} levels"] = " ".join(f"{lv[0]}{offloader.level_counts[lv] - before[lv]}"
                                                 for lv in levels) + \
                    f" r{offloader.counters['chunks_recompute_chosen'] - before_rc}"
        row["recompute"] = recompute_fn()
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    engine.shutdown()
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["MB/s"] for r in rows]
    for mode in [k for k in rows[0] if k != "MB/s" and not k.endswith("levels")]:
        ax.plot(x, [r[mode] for r in rows], marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth (MB/s)")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("Loading a stored context over a throttled link")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context-tokens", type=int, default=4096)
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--ttft-target-ms", type=float, default=2000,
                        help="TTFT target of the second adaptive mode (the first only has to beat recompute)")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis tier")
    parser.add_argument("--skip-trace", action="store_true")
    args = parser.parse_args()

    pool_tokens = 2 * (args.context_tokens + 64)
    base = make_engine(max_total_tokens=pool_tokens)
    prompts = contexts(base.tokenizer, args.contexts, args.context_tokens)
    print(f"{len(prompts)} held-out contexts of {args.context_tokens} tokens + a 32-token question", flush=True)

    def recompute() -> float:
        return sum(ttft(base, ids)[0] for ids in prompts) / len(prompts)

    recompute()  # warm-up
    recompute_s = recompute()
    print(f"  recompute TTFT {recompute_s:.3f} s", flush=True)
    rows = [{"tier": "none (recompute)", "level": "-", "ttft_s": recompute_s, "vs recompute": 1.0,
             "tokens loaded": 0, "MB stored/ctx": 0.0}] + tier_rows(args, prompts, pool_tokens, recompute_s)
    print_table(rows, list(rows[0]))
    trace = []
    if not args.skip_trace:
        trace = trace_rows(args, prompts, pool_tokens, recompute)
        print_table(trace, list(trace[0]))
        png = os.path.join(RESULTS_DIR, "kv_tiers_trace.png")
        plot(trace, png)
        print(f"wrote {png}")
    base.shutdown()
    write_json("bench_kv_tiers", {"args": vars(args), "tiers": rows, "trace": trace,
                                  "note": "disk reads come from a warm page cache"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
