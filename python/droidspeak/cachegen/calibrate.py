"""Make a model's codec profile (`transform.py`) from calibration texts: the KV
statistics of each layer's K and V over the contexts, and the diagonal Fisher
information of the next-token distribution of the text that follows them with
respect to every KV value.

The Fisher diagonal is estimated the standard way: sample each continuation
position's token from the model's own distribution and back-propagate the sum
of their log-probabilities into the context's KV. Cross terms between positions
vanish in expectation (the score of a sampled token has mean zero), so the
squared gradient is an unbiased estimate of the summed per-position Fisher.
`transformers` runs the forward and backward pass (our model code is built for
inference), in fp32, on the model's own directory; nothing is downloaded.
"""
from __future__ import annotations

import numpy as np
import torch

from droidspeak.cachegen.transform import CodecProfile, CodecProfileError, default_codec_profile_path

DEFAULT_PER_DOMAIN = 6  # built-in calibration texts per domain (code, docs, math)
WEIGHT_FLOOR = 1e-4  # x a layer half's mean weight: keeps every channel's weight (and the transform) invertible


def calibrate(model_dir: str, texts: list[tuple[str, str]], model_fingerprint: str = "",
              context_tokens: int = 512, continuation_tokens: int = 64, samples: int = 2,
              seed: int = 0, progress: bool = True) -> CodecProfile:
    """`texts`: (context, continuation) pairs."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    from droidspeak.tokenizer.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    stats: _Stats | None = None
    for context, continuation in tqdm(texts, desc="codec profile", disable=not progress, unit="text"):
        ctx = tok.encode(context, add_special_tokens=False)[:context_tokens]
        cont = tok.encode(continuation, add_special_tokens=False)[:continuation_tokens]
        if len(ctx) < 2 or not cont:
            continue
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.tensor([ctx]), cache=cache, use_cache=True)
        keys = [layer.keys[0].detach() for layer in cache.layers]      # [H, T, D] per layer
        values = [layer.values[0].detach() for layer in cache.layers]
        if stats is None:
            stats = _Stats(len(keys), keys[0].shape[0] * keys[0].shape[2])
        stats.add_values(keys, values)
        for _ in range(samples):
            k = [t.clone().requires_grad_(True) for t in keys]
            v = [t.clone().requires_grad_(True) for t in values]
            grad_cache = DynamicCache(config=model.config)
            for i, (ki, vi) in enumerate(zip(k, v)):
                grad_cache.update(ki[None], vi[None], i)
            logits = model(torch.tensor([cont]), cache=grad_cache, use_cache=True).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            logp.gather(1, y).sum().backward()
            stats.add_fisher([t.grad for t in k], [t.grad for t in v])
    if stats is None:
        raise ValueError("no calibration text gave a context of at least 2 tokens and a continuation")
    return stats.profile(model_fingerprint)


def ensure_profile(model_path: str, out: str | None = None, texts: list[tuple[str, str]] | None = None,
                   per_domain: int = DEFAULT_PER_DOMAIN, context_tokens: int = 512, samples: int = 2,
                   overwrite: bool = False, progress: bool = True) -> tuple[str, CodecProfile, bool]:
    """(path, profile, made) for the model directory `model_path`: the profile at
    `out` (default: where the engine looks) when it is current for these weights
    and not `overwrite`, else one calibrated on `texts` ((context, continuation)
    pairs; default: the built-in calibration set) and saved there."""
    import os

    from droidspeak.crossmodel.calibration import build_items
    from droidspeak.crossmodel.profile import fingerprint

    model_fp = fingerprint(model_path)
    out = out or default_codec_profile_path(model_path, model_fp)
    if os.path.isfile(out) and not overwrite:
        try:
            profile = CodecProfile.load(out)
            if profile.model == model_fp:
                return out, profile, False
        except CodecProfileError:
            pass
    if texts is None:
        texts = [(i.context, i.question)
                 for i in build_items("calibration", per_domain, context_chars=6 * context_tokens)]
    if progress:
        print(f"calibrating the KV codec for {model_path} over {len(texts)} texts", flush=True)
    profile = calibrate(model_path, texts, model_fp, context_tokens, samples=samples, progress=progress)
    profile.save(out)
    return out, profile, True


def _flat(t: torch.Tensor) -> np.ndarray:
    """[H, T, D] -> [T, H * D] float64 (the KV pool's channel order)."""
    return t.permute(1, 0, 2).reshape(t.shape[1], -1).double().numpy()


class _Stats:
    def __init__(self, layers: int, channels: int):
        self.n = 0                                          # context tokens seen
        self.sum = np.zeros((layers, 2, channels))
        self.outer = np.zeros((layers, 2, channels, channels))
        self.fisher = np.zeros((layers, 2, channels))      # summed over tokens and samples
        self.fisher_tokens = 0

    def add_values(self, keys, values) -> None:
        for i, (k, v) in enumerate(zip(keys, values)):
            for h, t in enumerate((k, v)):
                x = _flat(t)
                self.sum[i, h] += x.sum(0)
                self.outer[i, h] += x.T @ x
        self.n += keys[0].shape[1]

    def add_fisher(self, k_grads, v_grads) -> None:
        for i, (gk, gv) in enumerate(zip(k_grads, v_grads)):
            for h, g in enumerate((gk, gv)):
                self.fisher[i, h] += (_flat(g) ** 2).sum(0)
        self.fisher_tokens += k_grads[0].shape[1]

    def profile(self, model_fingerprint: str) -> CodecProfile:
        mean = self.sum / self.n
        cov = self.outer / self.n - mean[..., :, None] * mean[..., None, :]
        w = self.fisher / max(self.fisher_tokens, 1)
        w = np.maximum(w, WEIGHT_FLOOR * w.mean(axis=2, keepdims=True) + 1e-30)
        # scale so that the weighted variance averages 1 over all channels: steps
        # then read as fractions of a typical coefficient's spread, for any model
        var = np.diagonal(cov, axis1=2, axis2=3)
        w = w / float((w * var).mean())
        L, _, C = w.shape
        forward = np.empty((L, 2, C, C))
        inverse = np.empty((L, 2, C, C))
        for i in range(L):
            for h in range(2):
                s = np.sqrt(w[i, h])
                _, u = np.linalg.eigh(cov[i, h] * s[:, None] * s[None, :])
                forward[i, h] = s[:, None] * u
                inverse[i, h] = u.T / s[None, :]
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        return CodecProfile(model_fingerprint, f32(mean), f32(forward), f32(inverse))
