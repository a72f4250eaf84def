"""CacheGen codec on the default model's KV cache: size against bf16 and 8-bit
quantization, encode/decode time, and what each level does to the model's output,
measured against full recompute on held-out contexts (the KV of the context is
encoded, decoded back into the pool, and the model reads a question over it).

    python benchmark/bench_cachegen.py [--contexts 6] [--context-tokens 512] [--chunk 256]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from common import machine, print_table, write_json

LEVELS = ("lossless", "high", "medium", "low")


def quantize_8bit(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-(layer, channel) min-max uint8 round trip of [L, T, C]; returns (x_hat, bytes)."""
    xf = x.float()
    lo, hi = xf.amin(dim=1, keepdim=True), xf.amax(dim=1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / 255
    q = ((xf - lo) / scale).round().clamp(0, 255)
    return (q * scale + lo).to(x.dtype), q.numel() + 2 * lo.numel() * 2


def score(logits: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict:
    from droidspeak.crossmodel.quality import divergence
    lp = F.log_softmax(logits, -1)
    d = divergence(lp, F.log_softmax(ref, -1))
    return {"kl": d.kl, "agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "soft_ce_excess": d.excess, "nll": -lp.gather(1, targets[:, None]).mean().item()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=6)
    parser.add_argument("--context-tokens", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256, help="tokens per encoded chunk")
    args = parser.parse_args()

    from droidspeak import Engine
    from droidspeak.cachegen.codec import decode, encode
    from droidspeak.crossmodel.calibration import build_items
    from droidspeak.runner.sequence import Sequence

    engine = Engine(None, max_total_tokens=8 * (args.context_tokens + 512), disable_cross_model=True)
    runner, tok = engine.runner, engine.tokenizer
    items = [i for i in build_items("evaluation", args.contexts, context_chars=args.context_tokens * 5)
             if i.domain != "docs"][:args.contexts]
    totals = {m: {"bytes": 0, "encode_s": 0.0, "decode_s": 0.0, "kl": 0.0, "agreement": 0.0,
                  "soft_ce_excess": 0.0, "nll": 0.0} for m in ("bf16", "8-bit", *LEVELS)}
    tokens = 0
    for item in items:
        ctx = tok.encode(item.context, add_special_tokens=False)[:args.context_tokens]
        suffix = tok.encode(item.question, add_special_tokens=False)[:64]
        targets = torch.tensor(suffix[1:])
        ref_seq = Sequence(runner)
        ref_seq.extend(ctx)
        ref = ref_seq.extend(suffix)[:-1]
        k, v = ref_seq.kv(len(ctx))
        ref_seq.release()
        L, T, H, D = k.shape
        x = torch.cat([k.flatten(2), v.flatten(2)], dim=2)  # [L, T, 2 * H * D]
        tokens += T
        for mode in totals:
            start = time.perf_counter()
            if mode == "bf16":
                x_hat, size = x, x.numel() * x.element_size()
            elif mode == "8-bit":
                x_hat, size = quantize_8bit(x)
            else:
                bufs = [encode(x[:, s:s + args.chunk], mode) for s in range(0, T, args.chunk)]
                totals[mode]["encode_s"] += time.perf_counter() - start
                start = time.perf_counter()
                x_hat = torch.cat([decode(b) for b in bufs], dim=1)
                totals[mode]["decode_s"] += time.perf_counter() - start
                size = sum(len(b) for b in bufs)
            seq = Sequence(runner)
            seq.load(x_hat[..., :H * D].reshape(L, T, H, D), x_hat[..., H * D:].reshape(L, T, H, D))
            logits = seq.extend(suffix)[:-1]
            seq.release()
            totals[mode]["bytes"] += size
            for key, val in score(logits, ref, targets).items():
                totals[mode][key] += val
    rows = []
    n = len(items)
    for mode, t in totals.items():
        rows.append({"format": mode, "bytes/token": t["bytes"] / tokens,
                     "vs bf16": totals["bf16"]["bytes"] / t["bytes"], "vs 8-bit": totals["8-bit"]["bytes"] / t["bytes"],
                     "encode ms/chunk": 1000 * t["encode_s"] / max(1, tokens // args.chunk),
                     "decode ms/chunk": 1000 * t["decode_s"] / max(1, tokens // args.chunk),
                     "KL": t["kl"] / n, "agreement": t["agreement"] / n,
                     "soft CE +%": 100 * t["soft_ce_excess"] / n, "nll": t["nll"] / n})
    print_table(rows, list(rows[0]))
    path = write_json("bench_cachegen", {"machine": machine(), "args": vars(args), "contexts": n,
                                         "tokens": tokens, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
