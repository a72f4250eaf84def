"""Render every benchmark table in README.md and docs/*.md from benchmark/results/*.json.

    python benchmark/report.py           # rewrite the tables in place
    python benchmark/report.py --check   # exit 1, with a diff, if a table differs from its JSON

A table lives between `<!-- report:NAME -->` and `<!-- /report:NAME -->`; NAME is a
key of `TABLES`. Each table starts with the line that says which machine, command and
date produced its JSON, so a re-run of a benchmark plus this script updates the docs.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
MARKER = re.compile(r"<!-- report:([a-z0-9_]+) -->\n(.*?)<!-- /report:\1 -->", re.S)


def documents() -> list[str]:
    """README.md and every docs/*.md, relative to the repository root."""
    docs = os.path.join(ROOT, "docs")
    return ["README.md", *(os.path.join("docs", n) for n in sorted(os.listdir(docs)) if n.endswith(".md"))]


def load(name: str) -> dict:
    with open(os.path.join(ROOT, "benchmark", "results", f"{name}.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- formatting


def num(v: float) -> str:
    """Three significant figures, no exponent: 4011, 96.2, 1.87, 0.0051."""
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.2g}"
    return f"{v:.4f}" if v else "0"


def ratio(v: float) -> str:
    return f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def pct(v: float, signed: bool = True) -> str:
    return f"{v:+.2f}%" if signed else f"{v:.1f}%"


def table(columns: list[str], rows: list[list[str]]) -> list[str]:
    def cell(c) -> str:
        return str(c).replace("|", "\\|")
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cell(c) for c in r) + " |" for r in rows)]


def machine_line(d: dict, script: str) -> str:
    """Which machine, command and date produced a results file, from the file itself."""
    m = d.get("machine", {})
    isa = ", ".join(m["isa"]) if m.get("isa") else "ISA flags not recorded"
    command = f"`{d['command']}`" if d.get("command") else f"`{script}` (command line not recorded)"
    commit = f", commit {d['commit'][:10]}" if d.get("commit") else ""
    if not m:
        return f"*{command}; this results file records no machine or date.*"
    return (f"*{command} on {m.get('cpu', 'an unrecorded CPU')} ({isa}), {m.get('cores', '?')} cores, "
            f"{m.get('memory_gib', '?')} GiB, torch {m.get('torch', '?')}, Python {m.get('python', '?')}; "
            f"{d.get('time', 'date not recorded')}{commit}.*")


def short_machine(d: dict) -> str:
    m = d.get("machine", {})
    cpu = m.get("cpu", "?").replace("(R)", "").replace(" Processor", "")
    return f"{cpu} ({'+'.join(i for i in m.get('isa', []) if i != 'avx512f') or 'ISA not recorded'})"


# ---------------------------------------------------------------------------- tables


def one_batch(d: dict) -> list[str]:
    rows = []
    for r in d["rows"]:
        unit = "" if r["phase"] == "prefill" else " / step"
        rows.append([r["phase"], r["batch"], r["input_len"], num(r["ours_tok_s"]), num(r["hf_tok_s"]),
                     num(r["ours_ms"]) + unit, num(r["hf_ms"]) + unit, ratio(r["speedup"])])
    rss = d.get("rss_mib", {})
    out = table(["phase", "batch", "input len", "droidspeak tok/s", "transformers tok/s", "droidspeak ms",
                 "transformers ms", "speedup"], rows)
    if rss:
        out += ["", f"Resident memory after load: droidspeak {rss['droidspeak']:.0f} MiB, "
                    f"transformers {rss['transformers']:.0f} MiB."]
    return out


OFFLINE_WORKLOADS = {"no_shared_prefix": "distinct prompts", "shared_prefix": "one shared document + a question each"}


def offline(d: dict) -> list[str]:
    rows = [[OFFLINE_WORKLOADS.get(r["workload"], r["workload"]), r["requests"], r["prompt_tokens"], r["new_tokens"],
             num(r["ours_s"]), num(r["hf_s"]), num(r["ours_out_tok_s"]), num(r["hf_out_tok_s"]), ratio(r["speedup"])]
            for r in d["rows"]]
    p = d["prefix_reuse"]
    return table(["workload", "requests", "prompt tokens", "new tokens", "droidspeak s", "transformers s",
                  "droidspeak out tok/s", "transformers out tok/s", "speedup"], rows) + [
        "", f"Prefix reuse: a request adding {p['new_prompt_tokens']} prompt tokens to a cached "
            f"{p['prefix_tokens']:,}-token prefix gets its first token in {p['warm_ttft_s'] * 1e3:.1f} ms against "
            f"{p['cold_ttft_s'] * 1e3:.0f} ms cold: **{ratio(p['speedup'])}**."]


def serving_rows(rows: list[dict], first: str) -> list[list[str]]:
    return [[r[first], r["load"], num(r["req_s"]), num(r["out_tok_s"]),
             f"{num(r['ttft_p50_ms'])} / {num(r['ttft_p99_ms'])}", f"{num(r['itl_p50_ms'])} / {num(r['itl_p99_ms'])}",
             f"{num(r['e2e_p50_s'])}" + (f" / {num(r['e2e_p99_s'])}" if "e2e_p99_s" in r else "")]
            for r in rows]


def serving(d: dict) -> list[str]:
    return table(["system", "load", "req/s", "out tok/s", "TTFT p50 / p99 ms", "inter-token p50 / p99 ms",
                  "e2e p50 / p99 s"], serving_rows(d["rows"], "system"))


def process_split(d: dict) -> list[str]:
    return [f"Medians of {d['repeats']} alternated runs of {d['num_requests']} requests per cell.", ""] + table(
        ["layout", "load", "req/s", "out tok/s", "TTFT p50 / p99 ms", "inter-token p50 / p99 ms", "e2e p50 s"],
        serving_rows(d["medians"], "layout"))


def abuse(d: dict) -> list[str]:
    def answers(x: dict) -> str:
        return ", ".join(f"{v} x {k}" for k, v in x.items()) or "-"
    rows = [[name, f"{r['good requests']} ({r['good refused']})", f"{r['ttft p50 ms']:.0f} / {r['ttft p99 ms']:.0f}",
             f"{r['p99 / unloaded']:.1f}x", f"{r['itl p50 ms']:.0f}", answers(ph["hostile"]), answers(ph["rejected"]),
             answers(ph["aborted"]), f"{ph['idle_after_s']:.2f}"]
            for r, (name, ph) in zip(d["rows"], d["phases"].items())]
    a = d["leak_audit"]
    return [f"{d['dtype']}, {d['phase_s']:g} s phases; limits {json.dumps(d['limits'])}.", ""] + table(
        ["phase", "well-behaved requests (refused)", "TTFT p50 / p99 ms", "p99 / unloaded", "its inter-token p50 ms",
         "hostile answers", "rejected", "aborted", "idle after (s)"], rows) + [
        "", f"Leak audit after the run: idle after every phase {a['idle']}, cache flushed {a['flushed']}, "
            f"KV pool usage after the flush {a['kv_pool_usage_after_flush']:g}."]


def scaleout(d: dict) -> list[str]:
    def shared(r: dict, text: str) -> str:
        return text if r["shared_tier"] else "-"
    family = "receivers" in d
    rows = []
    for r in d["rows"]:
        tier = ("shared Redis" if r["shared_tier"] else "none") + "".join(" " + f for f in r.get("flags", []))
        row = [r["engines"], tier, num(r["req_s"]), f"{num(r['ttft_p50_ms'])} / {num(r['ttft_p99_ms'])}",
               f"{num(r['e2e_p50_s'])} / {num(r['e2e_p99_s'])}", pct(100 * r["later_turns_cached_share"], False)]
        if family:
            row.append(pct(100 * r["later_turns_cross_model_share"], False))
        row += [pct(100 * r["later_turns_store_share"], False),
                shared(r, f"{r.get('redis_bytes_written', 0) / 2**20:.0f} / {r.get('redis_bytes_read', 0) / 2**20:.0f}"),
                shared(r, f"{r.get('chunks_written', 0)} / {r.get('chunks_loaded', 0)} / "
                          f"{r.get('chunks_recompute_chosen', 0)}"),
                pct(100 * r["identical_answers"], False), pct(100 * r["agreeing_tokens"], False)]
        rows.append(row)
    threads = ", ".join(f"{n} engine(s): {t}" for n, t in d["threads_per_engine"].items())
    if family:
        shape = (f"{d['contexts']} held-out contexts of {d['context_tokens']} tokens, each read by the default model "
                 f"and then questioned by {', '.join(d['receivers'])}, concurrently")
    else:
        shape = (f"{d['conversations']} concurrent conversations of {d['turns']} turns over a "
                 f"~{d['context_chars']}-character held-out context")
    columns = ["engines", "tier", "req/s", "TTFT p50 / p99 ms", "e2e p50 / p99 s", "later turns: prompt cached",
               *(["of it cross-model"] if family else []), "from the store", "Redis MiB written / read",
               "chunks written / loaded / recomputed instead", "answers identical", "tokens agreeing"]
    return [f"{d['model']}, {d['dtype']}; {shape}, {d['max_new_tokens']} greedy tokens per answer; "
            f"routing: {d['routing']}; threads per engine: {threads}. Baseline: {d['baseline']}.", ""] + table(
        columns, rows)


def multi_model(d: dict) -> list[str]:
    rows = [[r["system"], num(r["req_s"]), num(r["out_tok_s"]), f"{num(r['ttft_p50_ms'])} / {num(r['ttft_p99_ms'])}",
             num(r["e2e_p50_s"]), f"{r['rss_mib'] / 1024:.1f} GiB"] for r in d["rows"]]
    return [f"{d['model']}; {d['rows'][0]['requests']} streaming requests, {d['concurrency']} concurrent clients. "
            f"Baseline: {d['baseline']}.", ""] + table(
        ["system", "req/s", "out tok/s", "TTFT p50 / p99 ms", "e2e p50 s", "resident memory"], rows)


def finetune_loss(d: dict) -> list[str]:
    loss = d["heldout_loss"]
    domains = list(next(iter(loss.values())))
    rows = []
    for model, by in loss.items():  # a fine-tune's own domain in bold (code-lora's is code)
        own = model.split("-")[0]
        label = f"{model} (base)" if model == d["base"] else model
        rows.append([label, *(f"**{by[c]:.3f}**" if c == own else f"{by[c]:.3f}" for c in domains)])
    return table(["model", *domains], rows)


def finetune_wholesale(d: dict) -> list[str]:
    rows = [[f"{'base' if r['sender'] == d['base'] else r['sender']} → {r['receiver']}", f"{r['kl']:.4f}",
             pct(100 * r["top1_agreement"], signed=False)] for r in d["wholesale_reuse"]]
    return [f"{d['context_tokens']}-token contexts prefilled by the sender; the receiver predicts the next tokens "
            f"over them, against its own full prefill.", ""] + table(["sender → receiver", "KL", "top-1 agreement"],
                                                                  rows)


def recomputed(q: dict, layers: int) -> str:
    s, e = q["group"]
    if s == e:
        return "nothing"
    span = f"all {layers} layers" if (s, e) == (0, layers) else f"layers [{s}, {e})"
    if q["tail"] >= 1:
        return f"{span}, all tokens" if (s, e) == (0, layers) else f"{span} over the whole context"
    return f"{span}, last {q['tail']:.0%} of the context and its first token"


def cross_model(d: dict) -> list[str]:
    layers = d["results"]["full"]["quality"][d["args"]["receivers"][0]]["group"][1]
    names = {"full": "full prefill", "wholesale": "wholesale reuse", "droidspeak": "droidspeak"}
    rows = []
    for mode, res in d["results"].items():
        for r in d["args"]["receivers"]:
            q = res["quality"][r]
            bold = (lambda s: f"**{s}**") if mode == "droidspeak" else (lambda s: s)
            acc = (f"{round(res['math_task_accuracy'] * res['math_answered'])}/{res['math_answered']}"
                   if r == "math" else "")
            rows.append([names.get(mode, mode), r, recomputed(q, layers), num(res["ttft_ms"][r]),
                         bold(ratio(res.get("prefill_speedup", {}).get(r, 1.0))),
                         bold(ratio(res.get("prefill_speedup_paired_median", {}).get(r, 1.0))),
                         f"{q['kl']:.4f}" if q["kl"] else "0", pct(100 * q["agreement"], signed=False),
                         bold(pct(100 * q["soft_ce_excess"])), num(res["load_requests_per_s"]), acc])
    a = d["args"]
    return [f"Sender {d['sender']}; {d['handoffs']} hand-offs over {a['context_tokens']}-token held-out contexts, "
            f"{a['new_tokens']} new tokens per answer; quality over the question and {a['quality_tokens']} generated "
            f"tokens against each receiver's own full prefill.", ""] + table(
        ["mode", "receiver", "recomputed", "TTFT ms", "prefill speedup", "paired", "KL", "greedy agreement",
         "soft CE vs full", "load req/s", "math accuracy"], rows)


def cachegen(d: dict) -> list[str]:
    chunk = d["args"]["chunk"]
    bf16 = d["rows"][0]["bytes/token"] * chunk / 1e6  # MB of bf16 KV per chunk
    rows = []
    for r in d["rows"]:
        enc, dec = r["encode ms/chunk"], r["decode ms/chunk"]
        timed = enc > 0
        bold = (lambda s: f"**{s}**") if r["format"] == "low+profile" else (lambda s: s)
        rows.append([bold(r["format"]), bold(f"{r['bytes/token']:.0f}"), bold(ratio(r["vs bf16"])),
                     bold(ratio(r["vs 8-bit"])), f"{enc:.0f} / {dec:.0f}" if timed else "-",
                     f"{bf16 / enc * 1e3:.0f} / {bf16 / dec * 1e3:.0f}" if timed else "-",
                     f"{r['KL']:.4f}" if r["KL"] else "0",
                     pct(100 * r["agreement"], signed=False),
                     f"{100 * r['accuracy']:.1f}% ({r['accuracy vs full %']:+.2f}%)", pct(r["soft CE +%"]),
                     bold(pct(r["perplexity +%"]))])
    a = d["args"]
    return [f"{d['contexts']} held-out contexts of {a['context_tokens']} tokens coded in {chunk}-token chunks; the "
            f"model reads the next {a['continuation_tokens']} tokens over the decoded KV. Codec profile tag "
            f"`{d.get('codec_profile_tag')}`.", ""] + table(
        ["format", "bytes/token", "vs bf16", "vs 8-bit", "encode / decode ms per chunk", "encode / decode MB/s",
         "KL", "greedy agreement", "next-token accuracy (vs full)", "soft CE vs full", "perplexity vs full"], rows)


def kv_tiers(d: dict) -> list[str]:
    rows = [[r["tier"], r["level"], f"{r['ttft_s']:.2f}", ratio(r["vs recompute"]), f"{r['MB stored/ctx']:.1f}"]
            for r in d["tiers"]]
    a = d["args"]
    return [f"{a['contexts']} held-out contexts of {a['context_tokens']:,} tokens plus a question, loaded from each "
            f"tier after the radix cache was dropped ({d.get('note', '')}).", ""] + table(
        ["tier", "level", "TTFT (s)", "vs recompute", "MB stored per context"], rows)


def kv_tiers_trace(d: dict) -> list[str]:
    target = f"adaptive {d['args']['ttft_target_ms']}ms"
    cols = ["MB/s", "high", "medium", "low", "adaptive", target, "recompute", "adaptive levels", f"{target} levels"]
    rows = [[r[c] if isinstance(r[c], str) or c == "MB/s" else f"{r[c]:.2f}" for c in cols] for r in d["trace"]]
    return table(["link MB/s", *cols[1:]], rows)


def kv_stream(d: dict) -> list[str]:
    cols = ["MB/s", "recompute TTFT s", "whole TTFT s", "pipelined TTFT s", "pipelined vs whole",
            "pipelined vs recompute", "tokens loaded/req (whole, pipelined)"]
    rows = [[r["MB/s"], *(f"{r[c]:.2f}" for c in cols[1:4]), ratio(r[cols[4]]), ratio(r[cols[5]]), r[cols[6]]]
            for r in d["rows"]]
    groups = ", ".join(f"{c['receiver']}: layers [{c['recompute_layers'][0]}, {c['recompute_layers'][1]}) over the "
                       f"last {c['recompute_tail']:.0%}" for c in d["cross_model"])
    a = d["args"]
    return [f"{a['contexts']} contexts of {a['context_tokens']:,} tokens; levels {a['levels']}; receivers' profiled "
            f"recompute: {groups}.", ""] + table(
        ["link MB/s", "recompute (s)", "whole prefix, then compute (s)", "pipelined (s)", "pipelined vs whole",
         "pipelined vs recompute", "tokens loaded per request (whole, pipelined)"], rows)


def headline(_: dict) -> list[str]:
    """The README's table: one line per goal, each from its own results file."""
    cm, cg, kt, ob, of = (load(n) for n in ("bench_cross_model", "bench_cachegen", "bench_kv_tiers",
                                            "bench_one_batch", "bench_offline"))
    ds, full = cm["results"]["droidspeak"], cm["results"]["full"]
    hand = ", ".join(f"{r} {ratio(ds['prefill_speedup'][r])} at {pct(100 * ds['quality'][r]['soft_ce_excess'])}"
                     for r in cm["args"]["receivers"])
    whole = cm["results"]["wholesale"]["quality"]
    low = next(r for r in cg["rows"] if r["format"] == "low+profile")
    ram = [r for r in kt["tiers"] if r["tier"] == "ram" and r["level"] != "lossless"]
    decode16 = next(r for r in ob["rows"] if r["phase"] == "decode" and r["batch"] == 16)
    prefill = max((r for r in ob["rows"] if r["phase"] == "prefill"), key=lambda r: r["input_len"])
    p = of["prefix_reuse"]
    rows = [
        ["fine-tune reuses another's context (DroidSpeak)", f"TTFT {hand} soft CE vs full prefill",
         f"full prefill; wholesale reuse loses "
         f"{', '.join(pct(100 * q['soft_ce_excess']) for q in whole.values())}", short_machine(cm)],
        ["under load, same hand-offs", f"{num(ds['load_requests_per_s'])} req/s",
         f"full prefill {num(full['load_requests_per_s'])} req/s", short_machine(cm)],
        ["KV codec, `low` + codec profile", f"{ratio(low['vs 8-bit'])} smaller than 8-bit at "
         f"{pct(low['perplexity +%'])} perplexity", "8-bit per-channel quantization", short_machine(cg)],
        [f"{kt['args']['context_tokens']:,}-token context from the RAM tier",
         f"TTFT {min(r['vs recompute'] for r in ram):.1f}-{max(r['vs recompute'] for r in ram):.1f}x faster",
         "prefilling it", short_machine(kt)],
        ["batch-16 decode", f"{num(decode16['ours_ms'])} ms per step, {ratio(decode16['speedup'])}",
         "transformers `generate`", short_machine(ob)],
        [f"prefill of {prefill['input_len']:,} tokens", f"{ratio(prefill['speedup'])}", "transformers forward",
         short_machine(ob)],
        [f"{p['new_prompt_tokens']} tokens after a cached {p['prefix_tokens']:,}-token prefix",
         f"TTFT {ratio(p['speedup'])} faster", "the same prompt cold", short_machine(of)],
    ]
    return table(["what", "droidspeak", "baseline (same run)", "machine"], rows)


# name -> (results file, renderer); a renderer returns the table's lines without the machine line.
TABLES = {
    "headline": (None, headline),
    "one_batch": ("bench_one_batch", one_batch),
    "offline": ("bench_offline", offline),
    "serving": ("bench_serving", serving),
    "process_split": ("bench_process_split", process_split),
    "abuse": ("bench_abuse", abuse),
    "multi_model": ("bench_multi_model", multi_model),
    "scaleout": ("bench_scaleout", scaleout),
    "scaleout_family": ("bench_scaleout_family", scaleout),
    "finetune_loss": ("finetunes", finetune_loss),
    "finetune_wholesale": ("finetunes", finetune_wholesale),
    "cross_model": ("bench_cross_model", cross_model),
    "cachegen": ("bench_cachegen", cachegen),
    "kv_tiers": ("bench_kv_tiers", kv_tiers),
    "kv_tiers_trace": ("bench_kv_tiers", kv_tiers_trace),
    "kv_stream": ("bench_kv_stream", kv_stream),
}


def render(name: str) -> str:
    results, fn = TABLES[name]
    if results is None:
        return "\n".join(fn({})) + "\n"
    d = load(results)
    script = "scripts/make_finetunes.py" if results == "finetunes" else f"benchmark/{results}.py"
    return "\n".join([machine_line(d, script), "", *fn(d)]) + "\n"


def rendered(text: str, path: str) -> str:
    def replace(m: re.Match) -> str:
        if m.group(1) not in TABLES:
            raise SystemExit(f"{path}: unknown table {m.group(1)!r} (known: {', '.join(TABLES)})")
        return f"<!-- report:{m.group(1)} -->\n{render(m.group(1))}<!-- /report:{m.group(1)} -->"
    return MARKER.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a table differs from its results file")
    args = parser.parse_args(argv)
    stale, seen = [], set()
    for rel in documents():
        path = os.path.join(ROOT, rel)
        with open(path) as f:
            text = f.read()
        seen.update(m.group(1) for m in MARKER.finditer(text))
        new = rendered(text, rel)
        if new == text:
            continue
        if args.check:
            stale.append(rel)
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), rel,
                                                       f"{rel} (from benchmark/results)", n=1))
        else:
            with open(path, "w") as f:
                f.write(new)
            print(f"updated {rel}")
    unused = sorted(set(TABLES) - seen)
    if unused:
        print(f"tables placed in no document: {', '.join(unused)}", file=sys.stderr)
        return 1
    if stale:
        print(f"\n{len(stale)} document(s) differ from benchmark/results: run python benchmark/report.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
