"""LoRA adapters in PEFT format (adapter_config.json + adapter_model.safetensors),
mapped onto droidspeak's fused projections."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from droidspeak.errors import ModelNotFoundError, UnsupportedModelError
from droidspeak.models.config import ModelConfig

# PEFT target module -> (our fused module, shard).
TARGETS = {"q_proj": ("qkv", "q"), "k_proj": ("qkv", "k"), "v_proj": ("qkv", "v"), "o_proj": ("o", None),
           "gate_proj": ("gate_up", "gate"), "up_proj": ("gate_up", "up"), "down_proj": ("down", None)}
_KEY = re.compile(r".*layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight")


@dataclass
class LoRAWeights:
    """One fused projection's low-rank update, every shard at once: the shards'
    A matrices stacked, and B laid out over the projection's full output width
    (zero outside each shard's columns), so the delta is two matmuls."""
    a: torch.Tensor      # [shards * r, in]
    b: torch.Tensor      # [out, shards * r], pre-multiplied by the adapter's scaling


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int
    base_model: str | None
    # (layer, fused module) -> the adapter's update of that projection
    weights: dict[tuple[int, str], LoRAWeights]
    native: object = field(default=None, repr=False, compare=False)  # kernels.LoRAStack, built on first use


def shard_ranges(config: ModelConfig) -> dict[str | None, tuple[int, int] | None]:
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, inter),
            "up": (inter, 2 * inter)}


def load_adapter(name: str, path: str, config: ModelConfig, dtype: torch.dtype) -> LoRAAdapter:
    cfg_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(weights_path)):
        raise ModelNotFoundError(
            f"{path!r} is not a PEFT LoRA adapter (needs adapter_config.json and adapter_model.safetensors)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModelError(f"adapter {name!r}: peft_type {cfg.get('peft_type')!r}; only LORA is supported")
    if cfg.get("fan_in_fan_out"):
        raise UnsupportedModelError(f"adapter {name!r}: fan_in_fan_out adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedModelError(f"adapter {name!r}: LoRA bias training is not supported")
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    pieces: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_path).items():
        m = _KEY.fullmatch(key)
        if m is None or m.group(2) not in TARGETS:
            raise UnsupportedModelError(f"adapter {name!r}: unsupported tensor {key!r}; "
                                        f"supported targets: {sorted(TARGETS)}")
        layer, target, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= config.num_layers:
            raise UnsupportedModelError(f"adapter {name!r}: layer {layer} but the base has {config.num_layers}")
        pieces.setdefault((layer, target), {})[ab] = tensor
    ranges = shard_ranges(config)
    full = {"o": config.hidden_size, "down": config.hidden_size, "qkv": config.q_size + 2 * config.kv_size,
            "gate_up": 2 * config.intermediate_size}
    shards: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, int, int]]] = {}
    for (layer, target), ab in sorted(pieces.items()):
        if set(ab) != {"A", "B"}:
            raise UnsupportedModelError(f"adapter {name!r}: layer {layer} {target} lacks lora_A or lora_B")
        module, shard = TARGETS[target]
        start, end = ranges[shard] if shard else (0, full[module])
        a, b = ab["A"], ab["B"]
        if b.shape[0] != end - start or a.shape[0] != rank or b.shape[1] != rank:
            raise UnsupportedModelError(f"adapter {name!r}: layer {layer} {target} has shapes "
                                        f"A{tuple(a.shape)} B{tuple(b.shape)}, expected rank {rank} and "
                                        f"{end - start} outputs")
        shards.setdefault((layer, module), []).append((a, b, start, end))
    weights = {}
    for (layer, module), parts in shards.items():
        b_full = torch.zeros(full[module], rank * len(parts))
        for i, (_, b, start, end) in enumerate(parts):
            b_full[start:end, i * rank:(i + 1) * rank] = b.float() * scaling
        a_cat = torch.cat([a.float() for a, _, _, _ in parts])
        weights[(layer, module)] = LoRAWeights(a_cat.to(dtype).contiguous(), b_full.to(dtype).contiguous())
    return LoRAAdapter(name, path, rank, cfg.get("base_model_name_or_path"), weights)
