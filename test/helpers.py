"""Tiny models built inside the tests: a byte-level BPE tokenizer trained on a small
corpus, and randomly initialised Llama / Qwen2 checkpoints saved by transformers."""
from __future__ import annotations

import os

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Caching keys and values saves recomputation across requests.",
    "Ünïcödé: naïve café, 東京タワー, русский текст, emoji 🙂🚀 and ∑∫√.",
    "Radix trees share prefixes; schedulers batch requests; samplers pick tokens.",
] * 4

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

# A ChatML-style template, like the default model's.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def build_tokenizer(path: str, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_tiny_model(path: str, arch: str = "llama", seed: int = 0, num_layers: int = 3,
                     rope_scaling: dict | None = None, tie: bool = True,
                     max_positions: int = 2048) -> str:
    """Save a random tiny model + tokenizer under `path`; returns `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer(path)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=160,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=max_positions, tie_word_embeddings=tie,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  rms_norm_eps=1e-5, initializer_range=0.2)
    torch.manual_seed(seed)
    if arch == "llama":
        rope = {"rope_type": "default", "rope_theta": 10000.0} if rope_scaling is None else \
            dict(rope_scaling, rope_theta=500000.0)
        model = LlamaForCausalLM(LlamaConfig(rope_parameters=rope, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                             **common))
    else:
        raise ValueError(arch)
    # Non-zero biases and norm weights so that the loader's handling of them is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


def derive_finetune(base: str, path: str, seed: int, scale: float = 0.05, declare_base: str | None = None) -> str:
    """A stand-in full fine-tune of `base` for engine tests: every tensor of every
    layer moved by `scale` times its own spread (as training all layers would),
    tokenizer and config copied."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    os.makedirs(path, exist_ok=True)
    for name in os.listdir(base):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(base, name), os.path.join(path, name))
    g = torch.Generator().manual_seed(seed)
    weights = load_file(os.path.join(base, "model.safetensors"))
    tuned = {k: (v + scale * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype).contiguous()
             for k, v in weights.items()}
    save_file(tuned, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if declare_base:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        cfg["droidspeak_base_model"] = declare_base
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
    return path
