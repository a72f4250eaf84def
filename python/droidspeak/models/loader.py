"""Build a model on the meta device, then fill it from safetensors files."""
from __future__ import annotations

import glob
import logging
import os

import torch
from safetensors import safe_open

from droidspeak.errors import ModelNotFoundError, UnsupportedModelError
from droidspeak.models.config import ModelConfig
from droidspeak.models.llama import LlamaForCausalLM
from droidspeak.models.weights import IGNORED, map_name

logger = logging.getLogger(__name__)


def _shard_offsets(config: ModelConfig) -> dict[str, tuple[int, int]]:
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, inter), "up": (inter, inter)}


def load_model(path: str, dtype: torch.dtype, max_positions: int) -> LlamaForCausalLM:
    if not os.path.isdir(path):
        raise ModelNotFoundError(f"model path {path!r} is not a directory")
    config = ModelConfig.from_dir(path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise UnsupportedModelError(
            f"no *.safetensors files in {path!r}; droidspeak loads safetensors "
            "checkpoints (or a GGUF file, converted once on first use)")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    params = dict(model.named_parameters())
    offsets = _shard_offsets(config)
    filled: dict[str, int] = {}  # parameter name -> rows written
    unknown: list[str] = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if IGNORED.match(name):
                    continue
                mapped = map_name(config.architecture, name)
                if mapped is None or mapped[0] not in params:
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # some tied checkpoints still store the head
                    unknown.append(name)
                    continue
                target, shard = mapped
                tensor = f.get_tensor(name)
                param = params[target]
                with torch.no_grad():
                    if shard is None:
                        if tuple(tensor.shape) != tuple(param.shape):
                            raise UnsupportedModelError(
                                f"{name}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
                        param.copy_(tensor)
                    else:
                        start, size = offsets[shard]
                        if tensor.shape[0] != size:
                            raise UnsupportedModelError(
                                f"{name}: {tensor.shape[0]} rows, expected {size}")
                        param[start:start + size].copy_(tensor)
                filled[target] = filled.get(target, 0) + tensor.shape[0]
    if unknown:
        raise UnsupportedModelError(f"checkpoint tensors with no destination: {sorted(unknown)[:10]}")
    missing = [n for n, p in params.items() if filled.get(n, 0) != p.shape[0]]
    if missing:
        raise UnsupportedModelError(f"parameters missing from the checkpoint: {missing[:10]}")
    model.init_rope(max_positions)
    model.eval().requires_grad_(False)
    logger.info("loaded %s (%s, %.1fM params, %s) from %s", config.architecture,
                config.num_layers, config.num_params / 1e6, dtype, path)
    return model
