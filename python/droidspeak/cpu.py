"""What the CPU is and can do, read once per process: the dtype choice, the
benchmarks' machine record and the logs all ask here."""
from __future__ import annotations

import functools
import os
import platform

# The CPU features the native kernels choose their paths by.
ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def isa() -> list[str]:
    """The kernel-relevant features this CPU has, best first."""
    flags = _cpuinfo()[1]
    return [f for f in ISA_FLAGS if f in flags]


def default_dtype() -> str:
    """bfloat16 where the CPU has native bf16 matrix support, else float32."""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(isa()) else "float32"


def describe() -> dict:
    """The machine record every benchmark result carries."""
    import psutil
    import torch
    return {"cpu": cpu_model(), "isa": isa(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "python": platform.python_version()}
