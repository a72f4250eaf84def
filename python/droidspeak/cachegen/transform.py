"""A model's codec profile: per layer, for K and for V, a centre and a linear
transform into coordinates where one quantization step fits every coefficient.

The transform whitens by importance, then decorrelates: with w the diagonal
Fisher information of the model's next-token distribution with respect to the
KV values (how much each channel's error costs) and U the eigenvectors of the
covariance of sqrt(w) * (x - centre),

    z = (x - centre) @ diag(sqrt(w)) @ U,    x = centre + z @ U^T @ diag(1 / sqrt(w)).

In z an error of e costs about |e|^2 whatever the coefficient, so a uniform step
is the right allocation (reverse water-filling: coefficients smaller than the
step cost no bits), and the coefficients are uncorrelated, which is what
coding them one by one needs. `calibrate.py` makes profiles; the codec takes one
to `encode` and refuses chunks coded with another (the header carries its tag).

Tokens are not equally important either: a model's attention sinks (its first
token, and later tokens it turns into sinks, often the first few " the" or " "
of a text) are read by every later query, and on SmolLM2-135M the handful of
them in a 512-token context carry about half of the context's Fisher
information. A sink's values in the early-middle layers point the way the first
token's do, so the profile also holds a sink detector for the encoder: each
layer's first-token V (`sink`, averaged over the calibration texts), how much
each layer's cosine similarity to it says about a token's importance
(`sink_weight`), and for bins of the weighted similarity the factor by which a
token's step is made finer (`sink_scales`: the square root of the bin's
importance against a typical token's, the rate-distortion rule, at most
SINK_MAX_SCALE). The chunk stores each token's factor, so decoding does not
depend on the detector.

Stored as safetensors (never pickled), checked on load: shapes, finite values
and forward @ inverse = identity.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from droidspeak import kernels

PROFILE_FORMAT = 2  # 2 added the sink detector; format 1 files still load, without one
INVERSE_TOLERANCE = 1e-3  # max |forward @ inverse - I| of a valid profile
SINK_BINS = 20  # bins of the sink score over [-1, 1]
SINK_MAX_SCALE = 4.0  # at most 4x finer steps: finer makes chunks larger at no better agreement
TOKEN_SCALE_CODE_MAX = 16  # a token's step is the level's / 2^(code / 4): at most 16x finer


class CodecProfileError(ValueError):
    """A codec profile file that is missing, malformed or for another model."""


@dataclass(frozen=True, eq=False)  # arrays: identity, not elementwise, equality
class CodecProfile:
    model: str             # the model's fingerprint
    centre: np.ndarray     # [L, 2, C] float32: K then V channels of each layer
    forward: np.ndarray    # [L, 2, C, C] float32
    inverse: np.ndarray    # [L, 2, C, C] float32
    sink: np.ndarray | None = None          # [L, C] float32: the first token's V per layer
    sink_weight: np.ndarray | None = None   # [L] float32 >= 0: each layer's say in the sink score
    sink_scales: np.ndarray | None = None   # [SINK_BINS] float32 in [1, SINK_MAX_SCALE]

    @property
    def num_layers(self) -> int:
        return self.centre.shape[0]

    @property
    def channels(self) -> int:
        """Channels of a KV row (K and V side by side)."""
        return 2 * self.centre.shape[2]

    @functools.cached_property
    def tag(self) -> int:
        """64-bit identity of the transform, written into every chunk it codes."""
        h = hashlib.blake2b(digest_size=8)
        for a in (self.centre, self.forward, self.inverse):
            h.update(np.ascontiguousarray(a, dtype="<f4").tobytes())
        return int.from_bytes(h.digest(), "little") or 1

    def check(self, first: int, layers: int, total: int, channels: int) -> None:
        """Raise ValueError unless it fits layers [first, first + layers) of a
        `total`-layer model with `channels` KV channels per token."""
        if total != self.num_layers or channels != self.channels or first + layers > total:
            raise ValueError(f"codec profile for {self.num_layers} layers x {self.channels} channels cannot code "
                             f"layers {first}..{first + layers} of a {total}-layer model with {channels} channels")

    @property
    def sink_layers(self) -> np.ndarray:
        """The layers the sink detector reads (none: it never refines a step)."""
        if self.sink_weight is None or not self.sink_scales.max() > 1:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.sink_weight > 0)

    def token_scale_codes(self, v: np.ndarray) -> np.ndarray:
        """[T] uint8 step codes (step = the level's / 2^(code / 4)) from `v`
        [len(sink_layers), T, C] fp32: the V halves of the sink layers' KV."""
        layers = self.sink_layers
        if v.shape[0] != layers.size or (layers.size and v.shape[2] != self.sink.shape[1]):
            raise ValueError(f"expected the V of {layers.size} sink layers, got {v.shape}")
        if not layers.size:
            return np.zeros(v.shape[1], dtype=np.uint8)
        score = sink_score(sink_similarity(v, self.sink[layers]), self.sink_weight[layers])
        return self._scale_codes[sink_bin(score)]

    @functools.cached_property
    def _scale_codes(self) -> np.ndarray:
        return np.clip(np.rint(4 * np.log2(self.sink_scales)), 0, TOKEN_SCALE_CODE_MAX).astype(np.uint8)

    def to_coefficients(self, x: np.ndarray, first: int) -> np.ndarray:
        """[layers, T, 2C] values of layers first.. -> coefficients z, same shape (fp32)."""
        return self._apply(x, first, forward=True)

    def from_coefficients(self, z: np.ndarray, first: int) -> np.ndarray:
        return self._apply(z, first, forward=False)

    def _apply(self, x: np.ndarray, first: int, forward: bool) -> np.ndarray:
        """forward: (x - centre) @ forward; else x @ inverse + centre."""
        # native on the calling thread: numpy's BLAS would run a thread pool of its
        # own on the KV store's threads, beside the engine's forward passes
        if kernels.native_available():
            mats, centre = self._tensors
            return kernels.codec_transform(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                                           mats[forward], centre, first, forward).numpy()
        return self._apply_numpy(x, first, forward)

    @functools.cached_property
    def _tensors(self) -> tuple[dict[bool, torch.Tensor], torch.Tensor]:
        """({forward?: transforms}, centre) as tensors sharing the arrays' memory."""
        return ({True: torch.from_numpy(self.forward), False: torch.from_numpy(self.inverse)},
                torch.from_numpy(self.centre))

    def _apply_numpy(self, x: np.ndarray, first: int, forward: bool) -> np.ndarray:
        """The reference of `kernels.codec_transform`."""
        mats = self.forward if forward else self.inverse
        L, T, C2 = x.shape
        C = C2 // 2
        out = np.empty((L, T, C2), dtype=np.float32)
        for i in range(L):
            for h in range(2):
                part = x[i, :, h * C:(h + 1) * C]
                centre = self.centre[first + i, h]
                if forward:
                    np.matmul(part - centre, mats[first + i, h], out=out[i, :, h * C:(h + 1) * C])
                else:
                    np.matmul(part, mats[first + i, h], out=out[i, :, h * C:(h + 1) * C])
                    out[i, :, h * C:(h + 1) * C] += centre
        return out

    def error_bound(self, step: float, first: int, layers: int) -> np.ndarray:
        """[layers, 2C] largest error per value when each coefficient is off by at most step / 2."""
        bound = np.abs(self.inverse[first:first + layers]).sum(axis=2) * (step / 2)  # [layers, 2, C]
        return bound.reshape(layers, -1).astype(np.float32)

    # ---- files ---------------------------------------------------------------
    def save(self, path: str) -> None:
        from safetensors.numpy import save_file
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        arrays = {"centre": self.centre, "forward": self.forward, "inverse": self.inverse}
        if self.sink is not None:
            arrays.update(sink=self.sink, sink_weight=self.sink_weight, sink_scales=self.sink_scales)
        save_file(arrays, tmp, metadata={"format": str(PROFILE_FORMAT), "model": self.model})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "CodecProfile":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="np") as f:
                meta = f.metadata() or {}
                names = ["centre", "forward", "inverse"] + [k for k in SINK_ARRAYS if k in f.keys()]
                arrays = {k: f.get_tensor(k) for k in names}
        except (OSError, SafetensorError, KeyError, ValueError) as e:
            raise CodecProfileError(f"{path}: not a codec profile ({e})") from None
        if meta.get("format") not in ("1", str(PROFILE_FORMAT)):
            raise CodecProfileError(f"{path}: codec profile format {meta.get('format')!r}, this build reads "
                                    f"1 and {PROFILE_FORMAT}")
        centre, forward, inverse = (arrays[k].astype(np.float32) for k in ("centre", "forward", "inverse"))
        if centre.ndim != 3 or centre.shape[1] != 2 or forward.shape != centre.shape + centre.shape[2:] \
                or inverse.shape != forward.shape:
            raise CodecProfileError(f"{path}: inconsistent shapes {centre.shape}, {forward.shape}, {inverse.shape}")
        if not all(np.isfinite(a).all() for a in (centre, forward, inverse)):
            raise CodecProfileError(f"{path}: non-finite values")
        eye = np.eye(centre.shape[2], dtype=np.float32)
        if float(np.abs(forward @ inverse - eye).max()) > INVERSE_TOLERANCE:
            raise CodecProfileError(f"{path}: the inverse transforms do not invert the forward ones")
        sink = {k: arrays[k].astype(np.float32) for k in SINK_ARRAYS if k in arrays}
        if sink:
            L, _, C = centre.shape
            shapes = tuple(sink[k].shape for k in SINK_ARRAYS if k in sink)
            if shapes != ((L, C), (L,), (SINK_BINS,)):
                raise CodecProfileError(f"{path}: sink detector shapes do not fit the profile")
            if not all(np.isfinite(a).all() for a in sink.values()) or (sink["sink_weight"] < 0).any() \
                    or not ((sink["sink_scales"] >= 1) & (sink["sink_scales"] <= SINK_MAX_SCALE)).all():
                raise CodecProfileError(f"{path}: sink detector values out of range")
        return cls(meta.get("model", ""), centre, forward, inverse, **sink)


SINK_ARRAYS = ("sink", "sink_weight", "sink_scales")


def sink_similarity(v: np.ndarray, sink: np.ndarray) -> np.ndarray:
    """[n, T] cosine similarity of each token's V `v` [n, T, C] to the sink V `sink`
    [n, C] of the same layer. Elementwise numpy only: the encoder runs it on the KV
    store's threads (see CodecProfile._apply)."""
    dots = (v * sink[:, None]).sum(axis=2)
    norms = np.sqrt((v * v).sum(axis=2) * (sink * sink).sum(axis=1)[:, None])
    return dots / np.maximum(norms, 1e-12)


def sink_score(cos: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """[T] each token's sink score: its similarities `cos` [n, T] averaged with the
    layers' weights `weight` [n]."""
    return (weight[:, None] * cos).sum(axis=0) / weight.sum()


def sink_bin(score: np.ndarray) -> np.ndarray:
    """The bin of each sink score (a weighted cosine similarity in [-1, 1])."""
    return np.clip(np.floor((score + 1) * (SINK_BINS / 2)), 0, SINK_BINS - 1).astype(np.int64)


def default_codec_profile_path(model_path: str, model_fingerprint: str) -> str:
    """Where `droidspeak codec-profile` puts a model's profile (named by its weights)."""
    from droidspeak.models.default_model import cache_dir
    name = os.path.basename(os.path.normpath(model_path))
    return os.path.join(cache_dir(), "codec_profiles", f"{name}-{model_fingerprint}.safetensors")
