"""droidspeak: an SGLang-style serving engine for families of fine-tuned models."""
from droidspeak.config import EngineConfig
from droidspeak.engine.engine import Engine
from droidspeak.sampling.params import SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams"]
__version__ = "0.1.0"
