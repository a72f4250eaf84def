"""droidspeak: an SGLang-style serving engine for families of fine-tuned models."""
from __future__ import annotations

import importlib

__all__ = ["Engine", "EngineConfig", "SamplingParams"]
__version__ = "0.1.0"

# Imported on first use, so `import droidspeak.<module>` (the CLI, a tool, the
# extension build) does not load the whole engine.
_EXPORTS = {"Engine": "droidspeak.engine.engine", "EngineConfig": "droidspeak.config",
            "SamplingParams": "droidspeak.sampling.params"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'droidspeak' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
