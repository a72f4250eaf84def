"""Checkpoint-name -> droidspeak-parameter mapping, one table per model family.

Each rule maps a Hugging Face tensor name (regex) to our parameter name and, for
fused parameters, the shard it fills: ("q", "k", "v") of `qkv_proj`, ("gate", "up")
of `gate_up_proj`.
"""
from __future__ import annotations

import re

_LAYER = r"model\.layers\.(\d+)\."

LLAMA_FAMILY_RULES: list[tuple[str, str, str | None]] = [
    (r"model\.embed_tokens\.weight", "embed_tokens.weight", None),
    (r"model\.norm\.weight", "norm.weight", None),
    (r"lm_head\.weight", "lm_head.weight", None),
    (_LAYER + r"input_layernorm\.weight", "layers.{0}.input_layernorm.weight", None),
    (_LAYER + r"post_attention_layernorm\.weight", "layers.{0}.post_attention_layernorm.weight", None),
    (_LAYER + r"self_attn\.q_proj\.(weight|bias)", "layers.{0}.self_attn.qkv_proj.{1}", "q"),
    (_LAYER + r"self_attn\.k_proj\.(weight|bias)", "layers.{0}.self_attn.qkv_proj.{1}", "k"),
    (_LAYER + r"self_attn\.v_proj\.(weight|bias)", "layers.{0}.self_attn.qkv_proj.{1}", "v"),
    (_LAYER + r"self_attn\.o_proj\.weight", "layers.{0}.self_attn.o_proj.weight", None),
    (_LAYER + r"mlp\.gate_proj\.weight", "layers.{0}.mlp.gate_up_proj.weight", "gate"),
    (_LAYER + r"mlp\.up_proj\.weight", "layers.{0}.mlp.gate_up_proj.weight", "up"),
    (_LAYER + r"mlp\.down_proj\.weight", "layers.{0}.mlp.down_proj.weight", None),
]

WEIGHT_RULES = {
    "LlamaForCausalLM": LLAMA_FAMILY_RULES,
    "Qwen2ForCausalLM": LLAMA_FAMILY_RULES,
}

# Checkpoint tensors that carry no weights we need (recomputed at load time).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def map_name(architecture: str, name: str) -> tuple[str, str | None] | None:
    """Our parameter name and shard id for a checkpoint tensor, None if unknown."""
    for pattern, target, shard in WEIGHT_RULES[architecture]:
        m = re.fullmatch(pattern, name)
        if m:
            return target.format(*m.groups()), shard
    return None
