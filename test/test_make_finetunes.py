"""scripts/make_finetunes.py end to end on a tiny base (a few steps): outputs load as
one family with the LoRA adapter, results are written, and a rerun resumes."""
import json
import os
import subprocess
import sys

from droidspeak import Engine
from helpers import build_tiny_model

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_finetunes.py")


def run(args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_make_finetunes_smoke(tmp_path):
    base = build_tiny_model(str(tmp_path / "base"), "llama")
    out, results = tmp_path / "ft", tmp_path / "finetunes.json"
    args = ["--base", base, "--out", str(out), "--results", str(results), "--steps", "3", "--lora-steps", "3",
            "--seq-len", "32", "--batch-size", "2", "--max-docs", "20", "--eval-blocks", "2", "--lora-rank", "4"]
    first = run(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("code", "docs", "math", "code-lora"):
        assert (out / name / "droidspeak_finetune.json").is_file()
    report = json.loads(results.read_text())
    assert set(report["heldout_loss"]) == {"base", "code", "docs", "math", "code-lora"}
    assert {(r["sender"], r["receiver"]) for r in report["wholesale_reuse"]} >= {("base", "code"), ("code", "math")}
    assert all(r["kl"] >= 0 and 0 <= r["top1_agreement"] <= 1 for r in report["wholesale_reuse"])
    engine = Engine(base, dtype="float32", max_total_tokens=512, models=(f"code={out / 'code'}",),
                    lora_paths=(f"code-lora={out / 'code-lora'}",))
    assert engine.lineage["code"].evidence == "declared"
    assert len(engine.generate("def f():", {"max_new_tokens": 3}, model="code-lora")["output_ids"]) == 3
    again = run(args + ["--skip-eval"], tmp_path)
    assert again.returncode == 0 and again.stdout.count("already made") == 4
