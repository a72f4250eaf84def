"""Prefill and decode latency/throughput of one batch, by batch size and input
length: droidspeak's engine vs transformers' forward / generate on the same work,
in the same run. Default model, bf16 (the CPU fast path).

    python benchmark/bench_one_batch.py [--quick]
"""
from __future__ import annotations

import argparse

import torch

from common import load_hf, print_table, rss_mib, timeit_alternating, write_json


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="smaller sweep")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed turns per case (the systems alternate; medians)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    from droidspeak import Engine
    rss0 = rss_mib()
    engine = Engine(dtype=args.dtype, max_total_tokens=80_000, max_running_requests=64,
                    chunked_prefill_size=8192)
    ours_rss = rss_mib() - rss0
    rss1 = rss_mib()
    hf = load_hf(engine.model_path, dtype)
    hf_rss = rss_mib() - rss1
    vocab = engine.runner.model_config.vocab_size

    prefill_cases = [(1, 512), (1, 2048), (4, 512)] if args.quick else \
        [(1, 128), (1, 512), (1, 2048), (4, 512), (8, 256)]
    # (8, 1024): batched decode over long contexts, as agent turns have, where
    # reading the KV cache rather than the weights sets the pace
    decode_cases = [(1, 128), (16, 128)] if args.quick else [(1, 128), (4, 128), (16, 128), (32, 128), (8, 1024)]
    rows = []

    for batch, length in prefill_cases:
        prompts = random_prompts(batch, length, vocab, seed=length + batch)
        one = {"temperature": 0, "max_new_tokens": 1}

        def ours():
            engine.flush_cache()
            engine.generate(input_ids=prompts, sampling_params=one)

        def theirs():
            with torch.inference_mode():
                hf(torch.tensor(prompts))

        t_ours, t_hf = timeit_alternating([ours, theirs], repeat=args.repeat)
        tokens = batch * length
        rows.append({"phase": "prefill", "batch": batch, "input_len": length,
                     "ours_tok_s": tokens / t_ours, "hf_tok_s": tokens / t_hf,
                     "ours_ms": t_ours * 1e3, "hf_ms": t_hf * 1e3, "speedup": t_hf / t_ours})

    steps = args.decode_steps
    for batch, length in decode_cases:
        prompts = random_prompts(batch, length, vocab, seed=7 + batch)

        def ours_gen(n):
            engine.flush_cache()
            engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": n,
                                                                "ignore_eos": True})

        def hf_gen(n):
            with torch.inference_mode():
                hf.generate(torch.tensor(prompts), attention_mask=torch.ones(batch, length, dtype=torch.long),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False)

        # decode time = (prefill + N tokens) - (prefill + 1 token)
        long_ours, short_ours, long_hf, short_hf = timeit_alternating(
            [lambda: ours_gen(steps + 1), lambda: ours_gen(1), lambda: hf_gen(steps + 1), lambda: hf_gen(1)],
            repeat=args.repeat)
        t_ours, t_hf = long_ours - short_ours, long_hf - short_hf
        tokens = batch * steps
        rows.append({"phase": "decode", "batch": batch, "input_len": length,
                     "ours_tok_s": tokens / t_ours, "hf_tok_s": tokens / t_hf,
                     "ours_ms": t_ours / steps * 1e3, "hf_ms": t_hf / steps * 1e3, "speedup": t_hf / t_ours})

    print_table(rows, ["phase", "batch", "input_len", "ours_tok_s", "hf_tok_s", "ours_ms", "hf_ms", "speedup"])
    print(f"resident memory after load: droidspeak {ours_rss:.0f} MiB (weights + touched KV), "
          f"transformers {hf_rss:.0f} MiB")
    write_json("bench_one_batch", {
        "model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "decode_steps": steps,
        "baseline": "transformers forward (prefill) / generate (decode), same dtype, same run",
        "ms_note": "prefill: ms per batch; decode: ms per step",
        "rows": rows, "rss_mib": {"droidspeak": ours_rss, "transformers": hf_rss},
    })


if __name__ == "__main__":
    main()
