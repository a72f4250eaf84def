"""Derive real fine-tunes of the default model from corpora that exist offline on
any machine with Python, then measure how much they differ.

  code        full fine-tune on the standard library's source files
  docs        full fine-tune on Python's reference documentation (pydoc_data.topics)
  math        full fine-tune on generated arithmetic word problems with worked answers
  code-lora   LoRA adapter (rank 16, all projections) on the standard library's source

Every parameter of the full fine-tunes is trained (as users' fine-tunes are). Saved
in Hugging Face format under $DROIDSPEAK_CACHE/finetunes/NAME (LoRA in PEFT format),
deterministic for a seed, resumable (finished models are skipped), with progress
bars. Then it reports held-out loss of each model on each domain and what wholesale
reuse of one model's KV cache does to another (greedy agreement and KL against the
receiver's own prefill), to benchmark/results/finetunes.json.

    python scripts/make_finetunes.py [--steps 80] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from droidspeak import cpu
from droidspeak.crossmodel.calibration import CORPORA, split

FULL_FINETUNES = ("code", "docs", "math")
LORA_FINETUNES = {"code-lora": "code"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- corpora (shared with the cross-model profiler's calibration sets) ----------
def blocks(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined with EOS and cut into [N, seq_len] blocks."""
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer.encode(d, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


# ---- training ------------------------------------------------------------------
def train(model, data: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, desc: str) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))  # 10-step warm-up
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _ in bar:
        batch = data[torch.randint(0, data.shape[0], (batch_size,), generator=g)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


def copy_tokenizer(base: str, out: str) -> None:
    for name in os.listdir(base):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(base, name), os.path.join(out, name))


def make_full(name: str, base: str, out: str, data: torch.Tensor, args, base_name: str) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    start = time.time()
    losses = train(model, data, args.steps, args.batch_size, args.lr, args.seed, f"full fine-tune {name}")
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    config["droidspeak_base_model"] = base_name
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    copy_tokenizer(base, tmp)
    return _finish(tmp, out, {"kind": "full", "steps": args.steps, "train_seconds": time.time() - start,
                              "final_loss": sum(losses[-10:]) / min(10, len(losses))})


def make_lora(name: str, base: str, out: str, data: torch.Tensor, args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                             target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none"))
    start = time.time()
    losses = train(model, data, args.lora_steps, args.batch_size, args.lora_lr, args.seed, f"LoRA {name}")
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    return _finish(tmp, out, {"kind": "lora", "rank": args.lora_rank, "steps": args.lora_steps,
                              "train_seconds": time.time() - start,
                              "final_loss": sum(losses[-10:]) / min(10, len(losses))})


def _finish(tmp: str, out: str, meta: dict) -> dict:
    with open(os.path.join(tmp, "droidspeak_finetune.json"), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # a finished model appears atomically: reruns skip it
    return meta


# ---- evaluation ----------------------------------------------------------------
@torch.inference_mode()
def heldout_loss(engine, model: str, data: torch.Tensor) -> float:
    """Mean next-token cross-entropy of `model` (served by our engine) on held-out blocks."""
    total, count = 0.0, 0
    for row in data:
        out = engine.generate(input_ids=row.tolist(), sampling_params={"max_new_tokens": 0},
                              return_logprob=True, logprob_start_len=1, model=model)
        lps = [lp for lp, _ in out["meta_info"]["input_token_logprobs"]]
        total -= sum(lps)
        count += len(lps)
    engine.flush_cache()
    return total / count


@torch.inference_mode()
def reuse_quality(engine, sender: str, receiver: str, rows: torch.Tensor, ctx: int) -> dict:
    """Receiver's next-token distributions over each row's suffix when the context's
    KV comes wholesale from `sender`, against the receiver's own full prefill."""
    from droidspeak.scheduler.sequence import Sequence
    runner = engine.runner
    s_target, r_target = engine.resolve(sender), engine.resolve(receiver)
    kls, agree, n = [], 0, 0
    for row in rows:
        ids = row.tolist()
        # logits at position p predict token p + 1; compare positions ctx .. total - 2,
        # where the reused variant has run the receiver over the sender's context KV.
        own_seq, sender_seq, reused_seq = Sequence(runner), Sequence(runner), Sequence(runner)
        own = own_seq.extend(ids, r_target.model_id, r_target.lora_id)[ctx:-1]
        sender_seq.extend(ids[:ctx], s_target.model_id, s_target.lora_id)
        reused_seq.reuse(sender_seq, ctx, None)
        reused = reused_seq.extend(ids[ctx:], r_target.model_id, r_target.lora_id)[:-1]
        for seq in (own_seq, sender_seq, reused_seq):
            seq.release()
        lp_own, lp_reused = F.log_softmax(own, -1), F.log_softmax(reused, -1)
        kls.append(F.kl_div(lp_reused, lp_own, log_target=True, reduction="none").sum(-1).mean().item())
        agree += (own.argmax(-1) == reused.argmax(-1)).sum().item()
        n += own.shape[0]
    return {"kl": sum(kls) / len(kls), "top1_agreement": agree / n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base model directory (default: the default model)")
    parser.add_argument("--out", default=None, help="output root (default: $DROIDSPEAK_CACHE/finetunes)")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per full fine-tune")
    parser.add_argument("--lora-steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--max-docs", type=int, default=400, help="documents per corpus")
    parser.add_argument("--eval-blocks", type=int, default=12, help="held-out blocks per domain to evaluate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--results", default=os.path.join("benchmark", "results", "finetunes.json"))
    args = parser.parse_args()

    from droidspeak.models.default_model import cache_dir, resolve_model_path
    from droidspeak.tokenizer.tokenizer import load_tokenizer
    base = resolve_model_path(args.base)
    base_name = os.path.basename(os.path.normpath(base))
    out_root = args.out or os.path.join(cache_dir(), "finetunes")
    os.makedirs(out_root, exist_ok=True)
    tokenizer = load_tokenizer(base)
    data = {}
    for domain, fn in CORPORA.items():
        train_docs, held_docs = split(fn(args.max_docs))
        data[domain] = (blocks(tokenizer, train_docs, args.seq_len), blocks(tokenizer, held_docs, args.seq_len))
        print(f"{domain}: {data[domain][0].shape[0]} training blocks, {data[domain][1].shape[0]} held-out blocks "
              f"of {args.seq_len} tokens", flush=True)

    made = {}
    for name in FULL_FINETUNES + tuple(LORA_FINETUNES):
        out = os.path.join(out_root, name)
        marker = os.path.join(out, "droidspeak_finetune.json")
        if os.path.isfile(marker):
            print(f"{name}: already made ({out}), skipping", flush=True)
            with open(marker) as f:
                made[name] = json.load(f)
            continue
        if name in LORA_FINETUNES:
            made[name] = make_lora(name, base, out, data[LORA_FINETUNES[name]][0], args)
        else:
            made[name] = make_full(name, base, out, data[name][0], args, base_name)
        print(f"{name}: saved to {out} ({made[name]['train_seconds']:.0f} s)", flush=True)
    if args.skip_eval:
        return 0

    from droidspeak import Engine
    engine = Engine(base, models=tuple(f"{n}={os.path.join(out_root, n)}" for n in FULL_FINETUNES),
                    lora_paths=tuple(f"{n}={os.path.join(out_root, n)}" for n in LORA_FINETUNES),
                    max_total_tokens=4 * args.seq_len * 4, max_running_requests=8)
    names = [base_name, *FULL_FINETUNES, *LORA_FINETUNES]
    domain_of = {"code": "code", "docs": "docs", "math": "math", "code-lora": "code"}
    losses = {}
    for model in tqdm(names, desc="held-out loss"):
        losses[model] = {d: heldout_loss(engine, model, data[d][1][:args.eval_blocks]) for d in CORPORA}
    reuse = []
    ctx = args.seq_len * 3 // 4
    pairs = [(base_name, n) for n in names[1:]] + [(a, b) for a in FULL_FINETUNES for b in FULL_FINETUNES if a != b]
    for sender, receiver in tqdm(pairs, desc="wholesale KV reuse"):
        rows = data[domain_of[receiver]][1][:args.eval_blocks]
        reuse.append({"sender": sender, "receiver": receiver, **reuse_quality(engine, sender, receiver, rows, ctx)})

    print("\nheld-out loss (nats/token), rows = model, columns = domain")
    print("model      | " + " | ".join(f"{d:>6}" for d in CORPORA))
    for model in names:
        print(f"{model:<10} | " + " | ".join(f"{losses[model][d]:6.3f}" for d in CORPORA))
    print(f"\nwholesale KV reuse ({ctx}-token context, {args.seq_len - ctx}-token suffix, receiver's domain)")
    for r in reuse:
        print(f"{r['sender']:>22} -> {r['receiver']:<10} KL {r['kl']:.4f}  top-1 agreement {r['top1_agreement']:.1%}")
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    with open(args.results, "w") as f:
        json.dump({"base": base_name, "args": vars(args), "made": made, "heldout_loss": losses,
                   "wholesale_reuse": reuse, "context_tokens": ctx, "machine": cpu.describe(),
                   "time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(["python", *sys.argv])},
                  f, indent=2)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
