"""Shared benchmark plumbing: machine description, timing, tables, JSON output,
and offline text (the Python standard library's own source files)."""
from __future__ import annotations

import json
import os
import statistics
import sys
import sysconfig
import time

import torch

from droidspeak import cpu

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    return cpu.describe()


def rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timeit_alternating(fns, repeat: int = 3, warmup: int = 1) -> list[float]:
    """Median wall time in seconds of each of `fns`, run in turn `repeat` times
    (after `warmup` turns): on a shared VM whose speed drifts within seconds,
    timing one system's runs after the other's puts the drift into the ratio."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def git_commit() -> str | None:
    """The checkout's commit, with `+` when its code (not its docs or results) has
    uncommitted changes."""
    import subprocess
    root = os.path.dirname(RESULTS_DIR)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "python", "csrc",
                                "setup.py", "benchmark", "scripts", ":!benchmark/results"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    payload = dict(payload, machine=machine(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                   command=" ".join(["python", *sys.argv]), commit=git_commit())
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}; python benchmark/report.py puts it into the docs")
    return path


def stdlib_texts(min_chars: int = 2000, limit: int = 200) -> list[str]:
    """Source files of the running Python's standard library, sorted by name:
    real text that exists on every machine with Python, no download."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
            if len(text) >= min_chars:
                out.append(text)
        if len(out) >= limit:
            break
    return out


def load_hf(model_path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    return model
