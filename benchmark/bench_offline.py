"""Offline throughput over many requests, with and without a shared prefix, and
the latency of a request whose 2,000-token prefix is already cached: droidspeak's
engine vs transformers' batched generate on the same prompts, in the same run.
Prompts are real text (Python standard-library source), default model, bf16.

    python benchmark/bench_offline.py [--num-requests 32]
"""
from __future__ import annotations

import argparse
import time

import torch

from common import load_hf, print_table, rss_mib, stdlib_texts, timeit, write_json

HF_BATCH = 16  # transformers' generate on padded batches of this size


def take_tokens(tokenizer, text: str, n: int, offset: int = 0) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[offset:offset + n]


def hf_generate_all(hf, prompts: list[list[int]], new_tokens: int, pad_id: int) -> None:
    for i in range(0, len(prompts), HF_BATCH):
        batch = prompts[i:i + HF_BATCH]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    from droidspeak import Engine
    engine = Engine(dtype=args.dtype, max_total_tokens=80_000, max_running_requests=64)
    hf = load_hf(engine.model_path, getattr(torch, args.dtype))
    tok = engine.tokenizer
    pad_id = tok.eos_token_id
    texts = stdlib_texts()
    n = args.num_requests

    workloads = {
        # distinct 256-token prompts, 64 new tokens each
        "no_shared_prefix": ([take_tokens(tok, texts[i], 256) for i in range(n)], 64),
        # one 1,024-token document + a distinct 64-token question each, 32 new tokens
        "shared_prefix": ([take_tokens(tok, texts[0], 1024) + take_tokens(tok, texts[i + 1], 64)
                           for i in range(n)], 32),
    }
    rows = []
    for name, (prompts, new_tokens) in workloads.items():
        params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}

        def ours():
            engine.flush_cache()
            engine.generate(input_ids=prompts, sampling_params=params)

        t_ours = timeit(ours, repeat=1, warmup=1)
        t_hf = timeit(lambda: hf_generate_all(hf, prompts, new_tokens, pad_id), repeat=1, warmup=0)
        out_tokens = n * new_tokens
        rows.append({"workload": name, "requests": n, "prompt_tokens": sum(map(len, prompts)),
                     "new_tokens": out_tokens, "ours_s": t_ours, "hf_s": t_hf,
                     "ours_out_tok_s": out_tokens / t_ours, "hf_out_tok_s": out_tokens / t_hf,
                     "speedup": t_hf / t_ours})

    # Prefix reuse: a 2,000-token context, then a request adding 16 new prompt tokens.
    context = take_tokens(tok, "\n".join(texts[:4]), 2000)
    follow_up = context + take_tokens(tok, texts[5], 16)
    one = {"temperature": 0, "max_new_tokens": 1}
    cold_times, warm_times = [], []
    for _ in range(3):
        engine.flush_cache()
        t = time.perf_counter()
        engine.generate(input_ids=context, sampling_params=one)
        cold_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = engine.generate(input_ids=follow_up, sampling_params=one)
        warm_times.append(time.perf_counter() - t)
    assert out["meta_info"]["cached_tokens"] == len(context)
    cold, warm = sorted(cold_times)[1], sorted(warm_times)[1]

    print_table(rows, ["workload", "requests", "prompt_tokens", "new_tokens", "ours_s", "hf_s",
                       "ours_out_tok_s", "hf_out_tok_s", "speedup"])
    print(f"prefix reuse (2,000-token cached prefix + 16 new prompt tokens, time to first token): "
          f"cold {cold * 1e3:.0f} ms, warm {warm * 1e3:.1f} ms, {cold / warm:.0f}x")
    print(f"peak RSS of the process: {rss_mib():.0f} MiB")
    write_json("bench_offline", {
        "model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
        "baseline": f"transformers generate, left-padded batches of {HF_BATCH}, same run",
        "rows": rows,
        "prefix_reuse": {"prefix_tokens": len(context), "new_prompt_tokens": 16,
                         "cold_ttft_s": cold, "warm_ttft_s": warm, "speedup": cold / warm},
    })


if __name__ == "__main__":
    main()
