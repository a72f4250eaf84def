"""CacheGen codec on the default model's KV cache: size against bf16 and 8-bit
quantization, encode/decode time, and what each level does to the model's output,
measured against full recompute on held-out texts: the KV of a text's first
`--context-tokens` tokens is encoded, decoded back into the pool, and the model
reads the text's next `--continuation-tokens` tokens over it (continuation
perplexity, KL, greedy agreement with the full KV's next-token predictions, and
the greedy predictions' accuracy against the text's own next tokens).
Every lossy level runs without and with the default model's codec profile
(`droidspeak codec-profile`; made here from the calibration half of the texts
when the cache has none), and, as the KV store does, keeps the first token of
a prompt's first chunk exactly. The `bf16, transformers` row is the floor: the
same context's KV as transformers computes it in bf16, read by our engine.
`--model` codes a fine-tune's own KV instead (a full fine-tune or a LoRA adapter of
the default model, served in one family with it) with the default model's profile,
as the engine codes every model of the family.

    python benchmark/bench_cachegen.py [--per-domain 10] [--context-tokens 512] [--chunk 256]
                                       [--model DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import load_hf, machine, print_table, write_json

LEVELS = ("lossless", "high", "medium", "low", "high+profile", "medium+profile", "low+profile")


def quantize_8bit(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-(layer, channel) min-max uint8 round trip of [L, T, C]; returns (x_hat, bytes)."""
    xf = x.float()
    lo, hi = xf.amin(dim=1, keepdim=True), xf.amax(dim=1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / 255
    q = ((xf - lo) / scale).round().clamp(0, 255)
    return (q * scale + lo).to(x.dtype), q.numel() + 2 * lo.numel() * 2


FLOOR = "bf16, transformers"


def transformers_kv(hf, ids: list[int]) -> torch.Tensor:
    """transformers' bf16 KV cache of `ids` (keys after RoPE, as the pool holds
    them) as [L, T, 2 * H * D], K and V of each layer side by side."""
    with torch.inference_mode():
        cache = hf(torch.tensor([ids]), use_cache=True).cache
    k = torch.stack([layer.keys[0].transpose(0, 1).flatten(1) for layer in cache.layers])
    v = torch.stack([layer.values[0].transpose(0, 1).flatten(1) for layer in cache.layers])
    return torch.cat([k, v], dim=2)


def score(logits: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict:
    from droidspeak.crossmodel.quality import divergence
    lp = F.log_softmax(logits, -1)
    d = divergence(lp, F.log_softmax(ref, -1))
    top1 = logits.argmax(-1)
    return {"kl": d.kl, "agreement": (top1 == ref.argmax(-1)).float().mean().item(),
            "accuracy": (top1 == targets).float().mean().item(),
            "soft_ce_excess": d.excess, "nll": -lp.gather(1, targets[:, None]).mean().item()}


def load_member(args):
    """The engine (the default model's family, holding `--model` when given), the
    coded model's name (None: the default model) and (model_id, lora_id), and
    transformers' bf16 copy of that model."""
    from droidspeak import Engine

    size = dict(dtype="bfloat16", max_total_tokens=8 * (args.context_tokens + 512), disable_cross_model=True)
    if not args.model:
        engine = Engine(None, **size)
        return engine, None, (0, None), load_hf(engine.model_path, torch.bfloat16)
    path = os.path.abspath(os.path.expanduser(args.model))
    name = os.path.basename(os.path.normpath(path))
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from peft import PeftModel

        engine = Engine(None, lora_paths=(f"{name}={path}",), **size)
        hf = PeftModel.from_pretrained(load_hf(engine.model_path, torch.bfloat16), path).merge_and_unload()
    else:
        engine = Engine(None, models=(f"{name}={path}",), **size)
        hf = load_hf(path, torch.bfloat16)
    target = engine.resolve(name)
    print(f"coding the KV of {name} ({engine.lineage[name].evidence}) with the family root's codec profile")
    return engine, name, (target.model_id, target.lora_id), hf


def load_or_make_profile(engine, path):
    """The default model's codec profile: `path`, the cache's, or one made now from
    the calibration texts (disjoint from the evaluation ones) and saved there."""
    from droidspeak.cachegen.calibrate import ensure_profile
    from droidspeak.cachegen.transform import CodecProfile

    if path:
        return CodecProfile.load(path)
    path, profile, made = ensure_profile(engine.model_path)
    print(f"codec profile: {path}{' (made now)' if made else ''}")
    return profile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-domain", type=int, default=10, help="held-out texts per domain (code, docs, math)")
    parser.add_argument("--context-tokens", type=int, default=512)
    parser.add_argument("--continuation-tokens", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=256, help="tokens per encoded chunk")
    parser.add_argument("--codec-profile", help="codec profile file (default: the cache's, made if missing)")
    parser.add_argument("--model", help="a fine-tune of the default model (full checkpoint or LoRA adapter "
                                        "directory) whose own KV to code (default: the default model)")
    args = parser.parse_args()

    from droidspeak.cachegen.codec import decode, encode
    from droidspeak.crossmodel.calibration import build_items
    from droidspeak.scheduler.sequence import Sequence

    engine, member, (model_id, lora_id), hf = load_member(args)
    runner, tok = engine.runner, engine.tokenizer
    profile = load_or_make_profile(engine, args.codec_profile)
    span = args.context_tokens + args.continuation_tokens
    items = [i for i in build_items("evaluation", args.per_domain, context_chars=span * 6)
             if len(tok.encode(i.context + i.question, add_special_tokens=False)) > args.context_tokens + 16]
    # "bf16, transformers": the context's KV as transformers computes it in bf16 (an
    # equally valid bf16 implementation; our own chunked prefill is bit-identical to
    # the unchunked one, so it shows nothing), read by our engine: how far bf16
    # arithmetic alone moves the predictions, the floor under the levels' numbers
    totals = {m: {"bytes": 0, "encode_s": 0.0, "decode_s": 0.0, "kl": 0.0, "agreement": 0.0, "accuracy": 0.0,
                  "soft_ce_excess": 0.0, "nll": 0.0} for m in ("bf16", FLOOR, "8-bit", *LEVELS)}
    tokens = chunks = 0
    ref_nll = 0.0
    for item in tqdm(items, desc="contexts", unit="context"):
        ids = tok.encode(item.context + item.question, add_special_tokens=False)
        ctx, suffix = ids[:args.context_tokens], ids[args.context_tokens:span]
        targets = torch.tensor(suffix[1:])
        ref_seq = Sequence(runner)
        ref_seq.extend(ctx, model_id, lora_id)
        ref = ref_seq.extend(suffix, model_id, lora_id)[:-1]
        x = ref_seq.kv_tensors(len(ctx))  # [L, T, 2 * H * D]
        ref_seq.release()
        T = x.shape[1]
        tokens += T
        chunks += -(-T // args.chunk)
        ref_nll += score(ref, ref, targets)["nll"]
        for mode in totals:
            start = time.perf_counter()
            if mode == "bf16":
                x_hat, size = x, x.numel() * x.element_size()
            elif mode == FLOOR:
                x_hat, size = transformers_kv(hf, ctx), x.numel() * x.element_size()
            elif mode == "8-bit":
                x_hat, size = quantize_8bit(x)
            else:
                level, _, with_profile = mode.partition("+")
                p = profile if with_profile else None
                bufs = [encode(x[:, s:s + args.chunk], level, profile=p, exact_tokens=int(s == 0))
                        for s in range(0, T, args.chunk)]
                totals[mode]["encode_s"] += time.perf_counter() - start
                start = time.perf_counter()
                x_hat = torch.cat([decode(b, p) for b in bufs], dim=1)
                totals[mode]["decode_s"] += time.perf_counter() - start
                size = sum(len(b) for b in bufs)
            seq = Sequence(runner)
            seq.load(x_hat)
            logits = seq.extend(suffix, model_id, lora_id)[:-1]
            seq.release()
            totals[mode]["bytes"] += size
            for key, val in score(logits, ref, targets).items():
                totals[mode][key] += val
    rows = []
    n = len(items)
    for mode, t in totals.items():
        rows.append({"format": mode, "bytes/token": t["bytes"] / tokens,
                     "vs bf16": totals["bf16"]["bytes"] / t["bytes"], "vs 8-bit": totals["8-bit"]["bytes"] / t["bytes"],
                     "encode ms/chunk": 1000 * t["encode_s"] / chunks,
                     "decode ms/chunk": 1000 * t["decode_s"] / chunks,
                     "KL": t["kl"] / n, "agreement": t["agreement"] / n, "accuracy": t["accuracy"] / n,
                     "accuracy vs full %": 100 * (t["accuracy"] / totals["bf16"]["accuracy"] - 1),
                     "soft CE +%": 100 * t["soft_ce_excess"] / n,
                     "perplexity +%": 100 * (math.exp((t["nll"] - ref_nll) / n) - 1), "nll": t["nll"] / n})
    print_table(rows, list(rows[0]))
    write_json("bench_cachegen" + (f"_{member}" if member else ""), {"machine": machine(), "args": vars(args), "contexts": n, "tokens": tokens,
                      "codec_profile_tag": f"{profile.tag:016x}", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
