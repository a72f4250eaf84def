"""Shared benchmark plumbing: machine description, timing, tables, JSON output,
and offline text (the Python standard library's own source files)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import sysconfig
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# The CPU features our kernels pick their paths by (VMs of one "model name" differ).
ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def machine() -> dict:
    cpu, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    import psutil
    return {"cpu": cpu, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version()}


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


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    payload = dict(payload, machine=machine(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                   command=" ".join(["python", *sys.argv]))
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
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
