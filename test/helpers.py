"""Tiny models built inside the tests: a byte-level BPE tokenizer trained on a small
corpus, and randomly initialised Llama / Qwen2 checkpoints saved by transformers."""
from __future__ import annotations

import os
import time

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
                     max_positions: int = 2048, dims: dict | None = None) -> str:
    """Save a random tiny model + tokenizer under `path`; returns `path`.
    `dims` overrides the sizes (hidden_size, intermediate_size, heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer(path)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=160,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=max_positions, tie_word_embeddings=tie,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  rms_norm_eps=1e-5, initializer_range=0.2)
    common.update(dims or {})
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


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_lora_adapter(base: str, path: str, seed: int, rank: int = 4, alpha: float = 8.0,
                       targets=LORA_TARGETS) -> str:
    """A PEFT-format LoRA adapter for `base` with random A and B (PEFT initialises B
    to zero; a trained adapter has both non-zero)."""
    import json

    from safetensors.torch import load_file, save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    weights = load_file(os.path.join(base, "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in targets:
            part = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            w = weights[f"model.layers.{layer}.{part}.{t}.weight"]
            prefix = f"base_model.model.model.layers.{layer}.{part}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
                   "base_model_name_or_path": base, "bias": "none", "fan_in_fan_out": False}, f)
    return path


def merge_lora(base: str, adapter: str, path: str) -> str:
    """`base` with the adapter merged into its weights (W + alpha/r * B @ A), saved as a full model."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    os.makedirs(path, exist_ok=True)
    for name in os.listdir(base):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(base, name), os.path.join(path, name))
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    scale = cfg["lora_alpha"] / cfg["r"]
    weights = load_file(os.path.join(base, "model.safetensors"))
    lora = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    for key in list(weights):
        a_key = "base_model.model." + key.replace(".weight", ".lora_A.weight")
        if a_key in lora:
            b = lora[a_key.replace("lora_A", "lora_B")]
            weights[key] = (weights[key].float() + scale * b @ lora[a_key]).contiguous()
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def record_fetches(offloader) -> list[list]:
    """[key, time it arrived] of every fetch a KV-store load queues, in queue order
    (the loader runs them first in, first out)."""
    fetches, submit = [], offloader._pool.submit

    def spy(fn, state, key, *args):
        entry = [key, None]
        fetches.append(entry)

        def timed(*a):
            out = fn(*a)
            entry[1] = time.perf_counter()
            return out
        return submit(timed, state, key, *args)
    offloader._pool.submit = spy
    return fetches


def pytest_without_amx(test_file: str, keyword: str) -> str:
    """Run the tests of `test_file` selected by `keyword` in a process with
    DROIDSPEAK_NO_AMX=1 (the tile state never requested, the vector kernels in
    use); returns pytest's output, failing on any failure."""
    import subprocess
    import sys
    # torch first: the extension links against its libraries (the package itself loads lazily)
    code = ("import sys, pytest, torch; from droidspeak import _C; assert not _C.amx_available(); "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {test_file!r}, '-k', {keyword!r}]))")
    env = dict(os.environ, DROIDSPEAK_NO_AMX="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(test_file), timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
    return done.stdout
