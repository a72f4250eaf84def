"""Agent hand-off through the KV store over a rate-limited link: the sender (the
default instruct model) reads a held-out context and its KV is written through to
the store; the receiver fine-tunes' trees are then empty (another engine, or
evicted), so each receiver loads the sender's chunks from the store and
recomputes its profiled layer group (DroidSpeak + CacheGen together).

Receiver TTFT, one request at a time, at each bandwidth, three ways in one run:

  recompute   no store: the receiver prefills the whole context itself
  whole       the store load completes, then the recompute and prefill run
              (--disable-kv-store-pipeline)
  pipelined   the request is admitted once its load is planned; the recompute
              and prefill wait per layer only for the part that layer reads, so
              compute runs while later layers stream in (the default)

Both store modes use the adaptive streamer (per chunk a level, or recompute at a
slow link); where they load the same chunks at the same levels they give the
same tokens (checked).

    python scripts/make_finetunes.py     # once (profiles: bench_cross_model.py makes them)
    python benchmark/bench_kv_stream.py [--contexts 3] [--context-tokens 2048]
"""
from __future__ import annotations

import argparse
import sys
import time

from common import machine, print_table, write_json
from bench_cross_model import add_family_args, build_handoffs, load_family

BANDWIDTHS_MBPS = (400, 100, 40, 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_family_args(parser)
    parser.add_argument("--contexts", type=int, default=4)
    parser.add_argument("--context-tokens", type=int, default=2048)
    parser.add_argument("--levels", default="high,low", help="levels the sender's chunks are stored at")
    args = parser.parse_args()

    from droidspeak import Engine
    from droidspeak.kvstore.link import ThrottledTier
    from droidspeak.tokenizer.tokenizer import load_tokenizer
    family = load_family(args)
    if family is None:
        return 1
    root_path, root, names, profiles = family
    handoffs = build_handoffs(load_tokenizer(root_path), args.contexts, args.context_tokens, args.seed, 0)
    pool = 3 * (args.context_tokens + 256) * (len(args.receivers) + 1)
    engine = Engine(None, models=tuple(f"{n}={p}" for n, p in names.items()), cross_model_profiles=profiles,
                    max_total_tokens=pool, kv_store="ram", kv_store_write="through", kv_store_levels=args.levels)
    sched, offloader = engine.scheduler, engine.offloader
    one = {"temperature": 0, "max_new_tokens": 1}
    engine.generate("warm up", one, model=args.receivers[0])
    for h in handoffs:  # the sender reads every context: its KV and E cache go to the store
        engine.generate(h["context"] + h["questions"][0], one, model=root)
    offloader.flush(600)
    sched.cache.write_through = False  # the receivers' own KV stays out: each load is the sender's
    state = offloader.store.states[0]
    link = ThrottledTier(state.tier, BANDWIDTHS_MBPS[0] * 1e6, latency_s=0.002)
    state.tier = link

    def ttft(receiver: str, h: dict, mode: str) -> tuple[float, dict, tuple]:
        engine.flush_cache()
        levels = dict(offloader.level_counts)
        sched.offloader = None if mode == "recompute" else offloader
        sched.pipeline = mode == "pipelined"
        start = time.perf_counter()
        out = engine.generate(h["context"] + h["questions"][args.receivers.index(receiver) + 1], one,
                              model=receiver)
        seconds = time.perf_counter() - start
        sched.offloader = offloader
        chosen = tuple(offloader.level_counts[lv] - levels[lv] for lv in levels)
        return seconds, out["meta_info"], (out["output_ids"], chosen)

    for h in handoffs:  # warm-up: one of each, so first-use costs land nowhere
        for mode in ("recompute", "whole", "pipelined"):
            ttft(args.receivers[0], h, mode)
    rows = []
    for mbps in BANDWIDTHS_MBPS:
        link.set_bandwidth(mbps * 1e6)
        row = {"MB/s": mbps}
        sums = {m: 0.0 for m in ("recompute", "whole", "pipelined")}
        loaded = {m: 0 for m in sums}
        n = 0
        for h in handoffs:
            for receiver in args.receivers:
                outs = {}
                for mode in sums:
                    seconds, meta, ids = ttft(receiver, h, mode)
                    sums[mode] += seconds
                    loaded[mode] += meta["kv_store_cached_tokens"]
                    outs[mode] = ids
                (whole_ids, whole_levels), (piped_ids, piped_levels) = outs["whole"], outs["pipelined"]
                if whole_levels == piped_levels and whole_ids != piped_ids:
                    raise SystemExit("whole and pipelined loads of the same chunks gave different tokens")
                n += 1
        for mode in sums:
            row[f"{mode} TTFT s"] = sums[mode] / n
        row["pipelined vs whole"] = sums["whole"] / sums["pipelined"]
        row["pipelined vs recompute"] = sums["recompute"] / sums["pipelined"]
        row["tokens loaded/req (whole, pipelined)"] = f"{loaded['whole'] / n:.0f}, {loaded['pipelined'] / n:.0f}"
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    print_table(rows, list(rows[0]))
    path = write_json("bench_kv_stream", {"machine": machine(), "args": vars(args), "rows": rows,
                                          "cross_model": engine.cross_policy.describe(),
                                          "kv_store": offloader.stats()})
    print(f"wrote {path}")
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
