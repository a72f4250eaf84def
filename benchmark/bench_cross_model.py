"""Agent hand-off over one context: the sender (the default instruct model) reads a
long context and answers; two fine-tunes (math, code; or any --receivers) then
answer other questions on the same context. Three engines in one run, same
models and prompts, their hand-offs interleaved (see run_modes):

  full        every model prefills the context itself (what engines do today)
  wholesale   receivers reuse the sender's KV in every layer
  droidspeak  receivers reuse it and recompute the profiled layer group

Reports receiver TTFT (one request at a time) and prefill speedup (ratio of mean
TTFTs, and the median of per-hand-off ratios), throughput of
all hand-offs submitted at once, and quality on held-out contexts (not the
profiler's calibration set): KL and greedy agreement against the receiver's own
full prefill, and task accuracy of the math fine-tune's generated answers.
Profiles missing for a pair are made first (droidspeak profile, resumable).

    python scripts/make_finetunes.py     # once
    python benchmark/bench_cross_model.py [--contexts 6] [--context-tokens 1024]
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import re
import shutil
import statistics
import sys
import time

import torch

from common import RESULTS_DIR, machine, percentile, print_table, write_json

CODE_QUESTIONS = ["\n\n# Q: Which names does the code above define?\n# A:",
                  "\n\n# Q: What would you test first in the code above?\n# A:",
                  "\n\n# Q: Summarize the code above in one line.\n# A:"]


def answer_of(text: str) -> int | None:
    """The number a worked answer arrives at ("... = 14. The answer is 14.")."""
    m = re.search(r"= (-?\d+)", text) or re.search(r"answer is (-?\d+)", text)
    return int(m.group(1)) if m else None


def build_handoffs(tokenizer, n: int, context_tokens: int, seed: int, task_questions: int) -> list[dict]:
    """Held-out contexts (the evaluation half; profiles use the other half), half
    worked math problems and half Python source, each with three questions (one
    per model); math contexts also carry `task_questions` extra problems for the
    math fine-tune's task accuracy."""
    from droidspeak.crossmodel.calibration import build_items, math_problem
    chars = context_tokens * 5
    items = build_items("evaluation", per_domain=n, context_chars=chars)
    rng = random.Random(seed)
    out = []
    task_rng = random.Random(seed + 1)
    for domain in ("math", "code"):
        for item in [i for i in items if i.domain == domain][:(n + 1) // 2 if domain == "math" else n // 2]:
            ids = tokenizer.encode(item.context, add_special_tokens=False)[:context_tokens]
            context = tokenizer.decode(ids)
            if domain == "math":
                context = context[:context.rindex("\n\n") + 2]
                problems = [math_problem(rng) for _ in range(3)]
                questions = [f"Question: {q}\nAnswer:" for q, _ in problems]
                answers = [answer_of(a) for _, a in problems]
                task = [math_problem(task_rng) for _ in range(task_questions)]
                tasks = [(f"Question: {q}\nAnswer:", answer_of(a)) for q, a in task]
            else:
                questions, answers, tasks = list(CODE_QUESTIONS), [None] * 3, []
            out.append({"domain": domain, "context": context, "questions": questions, "answers": answers,
                        "tasks": tasks})
    return out


def ensure_profiles(args, names: dict[str, str], root: str) -> str:
    from droidspeak.cli import main as cli
    out = args.profiles or os.path.join(os.environ.get("DROIDSPEAK_CACHE", os.path.expanduser("~/.cache/droidspeak")),
                                        "profiles", root)
    for receiver in args.receivers:
        rc = cli(["profile", "--sender", root, "--receiver", receiver, "--out", out, "--per-domain",
                  str(args.profile_per_domain), *model_flags(names)])
        if rc:
            raise SystemExit(f"profiling {root} -> {receiver} failed")
    return out


def add_family_args(parser: argparse.ArgumentParser) -> None:
    """The fine-tunes, their profiles and the seed of the held-out hand-offs."""
    parser.add_argument("--finetunes", default=None, help="default: $DROIDSPEAK_CACHE/finetunes")
    parser.add_argument("--receivers", nargs="+", default=["math", "code"])
    parser.add_argument("--profiles", default=None)
    parser.add_argument("--profile-per-domain", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)


def load_family(args):
    """(root path, root name, receiver name -> path, profile directory) for the
    default model and `args.receivers` from our fine-tune script, profiling pairs
    that have no profile yet; None (with a message) if a fine-tune is missing."""
    from droidspeak.models.default_model import cache_dir, resolve_model_path
    root_path = resolve_model_path(None)
    root = os.path.basename(os.path.normpath(root_path))
    ft = args.finetunes or os.path.join(cache_dir(), "finetunes")
    names = {n: os.path.join(ft, n) for n in args.receivers}
    missing = [p for p in names.values() if not os.path.isdir(p)]
    if missing:
        print(f"missing fine-tunes {missing}: run python scripts/make_finetunes.py first", file=sys.stderr)
        return None
    return root_path, root, names, ensure_profiles(args, names, root)


def model_flags(names: dict[str, str]) -> list[str]:
    flags = []
    for name, path in names.items():
        kind = "--lora-paths" if os.path.isfile(os.path.join(path, "adapter_config.json")) else "--model"
        flags += [kind, f"{name}={path}"]
    return flags


def make_engine(mode: str, names: dict[str, str], profiles: str, max_total_tokens: int):
    from droidspeak import Engine
    full = tuple(f"{n}={p}" for n, p in names.items() if not os.path.isfile(os.path.join(p, "adapter_config.json")))
    lora = tuple(f"{n}={p}" for n, p in names.items() if os.path.isfile(os.path.join(p, "adapter_config.json")))
    extra = {"full": {"disable_cross_model": True},
             "wholesale": {"cross_model_quality": 0.99},  # the frontier's first point: no layer recomputed
             "droidspeak": {}}[mode]
    return Engine(None, models=full, lora_paths=lora, cross_model_profiles=profiles,
                  max_total_tokens=max_total_tokens, **extra)


def greedy(n: int) -> dict:
    return {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}


def handoff(engine, h: dict, root: str, receivers: list[str], new_tokens: int) -> dict:
    """One hand-off, one request at a time: the sender reads the context and
    answers, then each receiver answers its own question (its TTFT is timed);
    then the math fine-tune's extra problems on the same context (task accuracy)."""
    engine.generate(h["context"] + h["questions"][0], greedy(new_tokens), model=root)
    ttft, outputs = {}, {}
    for j, receiver in enumerate(receivers, 1):
        reqs, _ = engine.make_requests(h["context"] + h["questions"][j], greedy(new_tokens), model=receiver)
        for _ in engine._drive(reqs):
            pass
        ttft[receiver] = reqs[0].first_token_time - reqs[0].created_time
        outputs[receiver] = engine.tokenizer.decode(reqs[0].output_ids)
    correct = answered = 0
    if h["tasks"] and "math" in receivers:
        outs = engine.generate([h["context"] + q for q, _ in h["tasks"]], greedy(new_tokens), model="math")
        for (_, gold), out in zip(h["tasks"], outs):
            correct += int(answer_of(out["text"]) == gold)
            answered += 1
    return {"ttft": ttft, "outputs": outputs, "correct": correct, "answered": answered}


def under_load(engine, handoffs, root: str, receivers: list[str], new_tokens: int) -> dict:
    """All senders first (their prefill is common to every mode), then every
    receiver request at once: wall time, requests/s and TTFT percentiles."""
    engine.generate([h["context"] + h["questions"][0] for h in handoffs], greedy(new_tokens), model=root)
    reqs = []
    for h in handoffs:
        for j, receiver in enumerate(receivers, 1):
            reqs.extend(engine.make_requests(h["context"] + h["questions"][j], greedy(new_tokens), model=receiver)[0])
    start = time.perf_counter()
    for _ in engine._drive(reqs):
        pass
    wall = time.perf_counter() - start
    ttft = [r.first_token_time - r.created_time for r in reqs]
    engine.flush_cache()
    return {"wall_s": wall, "requests": len(reqs), "output_tokens": sum(len(r.output_ids) for r in reqs),
            "ttft": ttft}


def run_modes(engines: dict, handoffs, root: str, receivers: list[str], new_tokens: int) -> tuple[dict, dict]:
    """Every mode on the same work, interleaved so that a drifting machine (this
    VM's speed moves 30-50% within minutes) weighs on all modes alike: each
    hand-off runs in every engine in turn (the order rotating per hand-off), and
    the load test runs in every engine twice, in forward then reverse order. The
    speedups are then paired: full TTFT over mode TTFT on the same hand-off."""
    modes = list(engines)
    ttft = {m: {r: [] for r in receivers} for m in modes}
    outputs = {m: {} for m in modes}
    tasks = {m: [0, 0] for m in modes}
    for i, h in enumerate(handoffs):
        for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
            got = handoff(engines[mode], h, root, receivers, new_tokens)
            for r in receivers:
                ttft[mode][r].append(got["ttft"][r])
                outputs[mode][(i, r)] = got["outputs"][r]
            tasks[mode][0] += got["correct"]
            tasks[mode][1] += got["answered"]
    for mode in modes:
        engines[mode].flush_cache()
    loads = {m: [] for m in modes}
    for mode in modes + modes[::-1]:
        loads[mode].append(under_load(engines[mode], handoffs, root, receivers, new_tokens))
    results = {}
    for mode in modes:
        runs = loads[mode]
        wall = sum(x["wall_s"] for x in runs)
        load_ttft = [t for x in runs for t in x["ttft"]]
        correct, answered = tasks[mode]
        results[mode] = {
            "ttft_ms": {r: 1000 * sum(v) / len(v) for r, v in ttft[mode].items()},
            "ttft_p50_ms": 1000 * percentile([x for v in ttft[mode].values() for x in v], 0.5),
            "ttft_each_ms": {r: [1000 * x for x in v] for r, v in ttft[mode].items()},
            "math_task_accuracy": correct / answered if answered else None, "math_answered": answered,
            "load_wall_s": wall / len(runs), "load_requests_per_s": sum(x["requests"] for x in runs) / wall,
            "load_output_tok_per_s": sum(x["output_tokens"] for x in runs) / wall,
            "load_ttft_p50_ms": 1000 * percentile(load_ttft, 0.5),
            "load_ttft_p99_ms": 1000 * percentile(load_ttft, 0.99),
            "cross_model": engines[mode].cross_policy.describe()}
        if mode != "full":
            full = ttft["full"]
            results[mode]["prefill_speedup"] = {r: sum(full[r]) / sum(ttft[mode][r]) for r in receivers}
            results[mode]["prefill_speedup_paired_median"] = {
                r: statistics.median(f / x for f, x in zip(full[r], ttft[mode][r])) for r in receivers}
    return results, outputs


def quality(engine, handoffs, root: str, receivers: list[str], mode: str, tokens: int) -> dict:
    """KL / agreement / text cross-entropy of each receiver on the hand-off prompts
    against its own full prefill, with the group this engine's policy uses."""
    from droidspeak.crossmodel.calibration import Item
    from droidspeak.crossmodel.profiler import Profiler
    out = {}
    for j, receiver in enumerate(receivers, 1):
        items = [Item(h["context"], h["questions"][j], None, h["domain"]) for h in handoffs]
        profiler = Profiler(engine, items, context_tokens=1 << 30, generate_tokens=tokens)
        variants = engine._variants()
        s, r = variants[root], variants[receiver]
        full_config = (0, engine.runner.model_config.num_layers, 1.0)
        if mode == "full" or (s, r) not in engine.cross_policy._pairs:
            config = full_config
        else:
            c = engine.cross_policy.choose(s, r, idle=False, tokens=1)
            config = (c.start, c.end, c.tail)
        scores = profiler.score_groups(root, receiver, [config])
        g, full = scores[config], scores[full_config]
        out[receiver] = {"group": list(config[:2]), "tail": config[2], "kl": g.kl, "agreement": g.agreement,
                         "soft_ce_excess": g.soft_ce / full.soft_ce - 1, "text_ce": g.ce, "text_ce_full": full.ce}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_family_args(parser)
    parser.add_argument("--contexts", type=int, default=6)
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--task-questions", type=int, default=8, help="extra math problems per math context")
    parser.add_argument("--quality-tokens", type=int, default=16, help="generated tokens scored per prompt")
    args = parser.parse_args()

    from droidspeak.tokenizer.tokenizer import load_tokenizer
    family = load_family(args)
    if family is None:
        return 1
    root_path, root, names, profiles = family
    for png in os.listdir(profiles):
        if png.endswith(".png") and png.startswith(root + "__"):
            shutil.copy(os.path.join(profiles, png), os.path.join(RESULTS_DIR, "profile_" + png))
    handoffs = build_handoffs(load_tokenizer(root_path), args.contexts, args.context_tokens, args.seed,
                              args.task_questions)
    pool = (len(handoffs) + 2) * (args.context_tokens + 256) * (len(args.receivers) + 1)
    modes = ("full", "wholesale", "droidspeak")
    engines = {}
    for mode in modes:
        engines[mode] = make_engine(mode, names, profiles, pool)
        engines[mode].generate("warm up", greedy(2), model=args.receivers[0])
    print(f"hand-offs in {', '.join(modes)}, interleaved ...", flush=True)
    results, texts = run_modes(engines, handoffs, root, args.receivers, args.new_tokens)
    for mode in modes:
        print(f"[{mode}] quality ...", flush=True)
        results[mode]["quality"] = quality(engines[mode], handoffs, root, args.receivers, mode, args.quality_tokens)
    del engines
    gc.collect()
    for mode in ("wholesale", "droidspeak"):
        same = sum(texts[mode][k] == texts["full"][k] for k in texts["full"])
        results[mode]["same_output_as_full"] = same / len(texts["full"])
    rows = []
    for mode in ("full", "wholesale", "droidspeak"):
        res = results[mode]
        for r in args.receivers:
            q = res["quality"][r]
            tail = f" last {q['tail']:.0%}" if q["tail"] < 1 else ""
            rows.append({"mode": mode, "receiver": r, "group": f"[{q['group'][0]}, {q['group'][1]}){tail}",
                         "TTFT ms": res["ttft_ms"][r],
                         "speedup": res.get("prefill_speedup", {}).get(r, 1.0),
                         "paired": res.get("prefill_speedup_paired_median", {}).get(r, 1.0),
                         "KL": q["kl"], "agree": q["agreement"], "softCE+%": 100 * q["soft_ce_excess"],
                         "load req/s": res["load_requests_per_s"], "math acc": res["math_task_accuracy"]})
    print_table(rows, ["mode", "receiver", "group", "TTFT ms", "speedup", "paired", "KL", "agree", "softCE+%",
                       "load req/s", "math acc"])
    path = write_json("bench_cross_model", {"machine": machine(), "args": vars(args), "sender": root,
                                      "handoffs": len(handoffs), "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
