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

A second pass over the same texts fits the sink detector (`transform.py`): one
sampled continuation per text gives each context token's importance in the
finished profile's coordinates, set against how close its V is to the first
token's in every layer.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from droidspeak.cachegen.transform import (SINK_BINS, SINK_MAX_SCALE, CodecProfile, CodecProfileError,
                                           default_codec_profile_path, sink_bin, sink_score, sink_similarity)

DEFAULT_PER_DOMAIN = 6  # built-in calibration texts per domain (code, docs, math)
WEIGHT_FLOOR = 1e-4  # x a layer half's mean weight: keeps every channel's weight (and the transform) invertible


def calibrate(model_dir: str, texts: list[tuple[str, str]], model_fingerprint: str = "",
              context_tokens: int = 512, continuation_tokens: int = 64, samples: int = 2,
              seed: int = 0, progress: bool = True) -> CodecProfile:
    """`texts`: (context, continuation) pairs."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from droidspeak.tokenizer.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    stats: _Stats | None = None
    used = []
    for context, continuation in tqdm(texts, desc="codec profile", disable=not progress, unit="text"):
        ctx = tok.encode(context, add_special_tokens=False)[:context_tokens]
        cont = tok.encode(continuation, add_special_tokens=False)[:continuation_tokens]
        if len(ctx) < 2 or not cont:
            continue
        used.append((ctx, cont))
        keys, values = _context_kv(model, ctx)
        if stats is None:
            stats = _Stats(len(keys), keys[0].shape[0] * keys[0].shape[2])
        stats.add_values(keys, values)
        for _ in range(samples):
            stats.add_fisher(*_kv_grads(model, keys, values, cont, gen))
    if stats is None:
        raise ValueError("no calibration text gave a context of at least 2 tokens and a continuation")
    profile = stats.profile(model_fingerprint)
    # the sink detector: each token's importance in the profile's metric (the
    # squared gradient with respect to its coefficients, which is the gradient
    # over sqrt(w) since U is orthonormal), one sample per text, against its V's
    # similarity to the first token's in each layer
    w = stats.weights()
    sink = stats.first_v / stats.texts
    cos, importance = [], []
    for ctx, cont in tqdm(used, desc="sink detector", disable=not progress, unit="text"):
        keys, values = _context_kv(model, ctx)
        k_grads, v_grads = _kv_grads(model, keys, values, cont, gen)
        r = sum((_flat(gk) ** 2 / w[i, 0]).sum(1) + (_flat(gv) ** 2 / w[i, 1]).sum(1)
                for i, (gk, gv) in enumerate(zip(k_grads, v_grads)))
        c = sink_similarity(np.stack([_flat(t) for t in values]), sink)   # [L, T]
        cos.append(c[:, 1:])  # the first token is the sink itself (and stored exactly)
        importance.append(r[1:])
    weight, scales = fit_sink_detector(np.concatenate(cos, axis=1), np.concatenate(importance))
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return dataclasses.replace(profile, sink=f32(sink), sink_weight=f32(weight), sink_scales=f32(scales))


SINK_MIN_CORRELATION = 0.1  # a layer votes when its similarity correlates this well with log importance
SINK_MIN_BIN_TOKENS = 8     # a bin with fewer calibration tokens keeps the scale of the bin below it


def fit_sink_detector(cos: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sink_weight [L], sink_scales [SINK_BINS]) from each calibration token's
    similarity to the sink V per layer `cos` [L, N] and its importance [N]:
    layers vote by how well their similarity correlates with log importance;
    bins above the most populated one (the typical token's) refine the step by
    the square root of their mean importance against that bin's, kept
    non-decreasing with the score and within [1, SINK_MAX_SCALE]."""
    log_r = np.log(np.maximum(importance, 1e-30))
    corr = np.array([np.corrcoef(c, log_r)[0, 1] if c.std() > 0 else 0.0 for c in cos])
    weight = np.where(np.nan_to_num(corr) > SINK_MIN_CORRELATION, corr, 0.0)
    scales = np.ones(SINK_BINS)
    if not weight.any() or log_r.std() == 0:
        return weight, scales
    bins = sink_bin(sink_score(cos, weight))
    counts = np.bincount(bins, minlength=SINK_BINS)
    mean = np.bincount(bins, weights=importance, minlength=SINK_BINS) / np.maximum(counts, 1)
    typical = int(np.argmax(counts))
    for b in range(typical + 1, SINK_BINS):
        ratio = mean[b] / mean[typical] if counts[b] >= SINK_MIN_BIN_TOKENS else 0.0
        scales[b] = max(scales[b - 1], min(np.sqrt(max(ratio, 1.0)), SINK_MAX_SCALE))
    return weight, scales


def _context_kv(model, ctx: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The context's keys and values, [H, T, D] per layer."""
    from transformers.cache_utils import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([ctx]), cache=cache, use_cache=True)
    return [layer.keys[0].detach() for layer in cache.layers], [layer.values[0].detach() for layer in cache.layers]


def _kv_grads(model, keys, values, cont: list[int], gen: torch.Generator):
    """Gradients of one sampled continuation's log-probability with respect to
    the context's keys and values (lists of [H, T, D])."""
    from transformers.cache_utils import DynamicCache
    k = [t.clone().requires_grad_(True) for t in keys]
    v = [t.clone().requires_grad_(True) for t in values]
    cache = DynamicCache(config=model.config)
    for i, (ki, vi) in enumerate(zip(k, v)):
        cache.update(ki[None], vi[None], i)
    logits = model(torch.tensor([cont]), cache=cache, use_cache=True).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
    logp.gather(1, y).sum().backward()
    return [t.grad for t in k], [t.grad for t in v]


def ensure_profile(model_path: str, out: str | None = None, texts: list[tuple[str, str]] | None = None,
                   per_domain: int = DEFAULT_PER_DOMAIN, context_tokens: int = 512, samples: int = 2,
                   overwrite: bool = False, progress: bool = True) -> tuple[str, CodecProfile, bool]:
    """(path, profile, made) for the model directory `model_path`: the profile at
    `out` (default: where the engine looks) when it is current for these weights (and has a sink detector)
    and not `overwrite`, else one calibrated on `texts` ((context, continuation)
    pairs; default: the built-in calibration set) and saved there."""
    import os

    from droidspeak.crossmodel.calibration import build_items
    from droidspeak.models.identity import fingerprint

    model_fp = fingerprint(model_path)
    out = out or default_codec_profile_path(model_path, model_fp)
    if os.path.isfile(out) and not overwrite:
        try:
            profile = CodecProfile.load(out)
            if profile.model == model_fp and profile.sink is not None:  # format 1: made again
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
        self.first_v = np.zeros((layers, channels))  # summed over texts
        self.texts = 0

    def add_values(self, keys, values) -> None:
        for i, (k, v) in enumerate(zip(keys, values)):
            for h, t in enumerate((k, v)):
                x = _flat(t)
                self.sum[i, h] += x.sum(0)
                self.outer[i, h] += x.T @ x
            self.first_v[i] += _flat(v)[0]
        self.n += keys[0].shape[1]
        self.texts += 1

    def add_fisher(self, k_grads, v_grads) -> None:
        for i, (gk, gv) in enumerate(zip(k_grads, v_grads)):
            for h, g in enumerate((gk, gv)):
                self.fisher[i, h] += (_flat(g) ** 2).sum(0)
        self.fisher_tokens += k_grads[0].shape[1]

    def covariance(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.sum / self.n
        return mean, self.outer / self.n - mean[..., :, None] * mean[..., None, :]

    def weights(self) -> np.ndarray:
        """[L, 2, C] each channel's weight: its Fisher information, floored, scaled so
        that the weighted variance averages 1 over all channels (steps then read as
        fractions of a typical coefficient's spread, for any model)."""
        w = self.fisher / max(self.fisher_tokens, 1)
        w = np.maximum(w, WEIGHT_FLOOR * w.mean(axis=2, keepdims=True) + 1e-30)
        var = np.diagonal(self.covariance()[1], axis1=2, axis2=3)
        return w / float((w * var).mean())

    def profile(self, model_fingerprint: str) -> CodecProfile:
        mean, cov = self.covariance()
        w = self.weights()
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
