"""The CacheGen KV codec: one chunk of tokens of a [layers, tokens, channels]
tensor (K and V of each layer side by side, or E-cache rows) to bytes and back.

Lossy levels follow CacheGen: tokens are cut into groups (default 10); the first
token of a group is an *anchor*, quantized on its own, and the others are coded as
deltas from the dequantized anchor (neighbouring tokens' KV are close, so deltas
are small). Quantization steps are per (layer, channel), a multiple of that
channel's spread, finer for early layers (their errors propagate through every
later layer) and finer for anchors. The integer symbols are entropy coded with
`constriction`'s range coder, one Laplace table per (layer, channel), its
scale rounded to a fixed grid so that rows sharing a scale share one table. Every element is reconstructed within half its step (`error_bound`).
The lossless level codes the raw bytes plane by plane with one categorical
distribution per (layer, byte plane), or stores a plane raw where coding would not
make it smaller (low mantissa bytes are close to uniform).

Format (little-endian): magic "DSKV", version, level, dtype, group size, shape,
payload length, CRC-32 of everything after the CRC field, payload. `decode`
checks all of it before trusting a byte, and never unpickles.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import constriction
import numpy as np
import torch

MAGIC = b"DSKV"
VERSION = 2
HEADER = struct.Struct("<4sHBBHIIIII")  # magic, version, level, dtype, group, L, T, C, payload, crc
DEFAULT_GROUP = 10
MAX_ELEMENTS = 1 << 31
MIN_STD = 1e-4  # channels with (near) constant values still get a usable step


@dataclass(frozen=True)
class Level:
    name: str
    anchor_step: float                     # x channel std
    delta_steps: tuple[float, float, float]  # x channel std, for the first / middle / last third of layers


LOSSLESS = 0
LEVELS = {
    1: Level("high", 0.02, (0.04, 0.06, 0.08)),
    2: Level("medium", 0.04, (0.08, 0.12, 0.16)),
    3: Level("low", 0.08, (0.16, 0.24, 0.32)),
}
LEVEL_NAMES = {"lossless": LOSSLESS, **{lv.name: i for i, lv in LEVELS.items()}}
DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


class CodecError(ValueError):
    """Bytes that are not a valid chunk of this codec (corrupt, truncated, foreign)."""


def encode(x: torch.Tensor, level: int | str = "medium", group: int = DEFAULT_GROUP) -> bytes:
    """Encode `x` [layers, tokens, channels] (fp32, bf16 or fp16) at `level`."""
    level = LEVEL_NAMES[level] if isinstance(level, str) else level
    if level != LOSSLESS and level not in LEVELS:
        raise ValueError(f"unknown level {level}; levels: {sorted(LEVEL_NAMES)}")
    if x.dim() != 3 or x.dtype not in DTYPE_CODES:
        raise ValueError(f"expected a [layers, tokens, channels] tensor of {sorted(map(str, DTYPE_CODES))}")
    if not 1 <= group <= 0xFFFF:
        raise ValueError("group must be in [1, 65535]")
    L, T, C = x.shape
    x = x.detach().cpu().contiguous()
    payload = _encode_lossless(x) if level == LOSSLESS else _encode_lossy(x, LEVELS[level], group)
    body = HEADER.pack(MAGIC, VERSION, level, DTYPE_CODES[x.dtype], group, L, T, C, len(payload), 0)[:-4]
    crc = zlib.crc32(payload, zlib.crc32(body))
    return body + struct.pack("<I", crc) + payload


def decode(buf: bytes) -> torch.Tensor:
    header, payload = _check(buf)
    level, dtype, group, shape = header
    if level == LOSSLESS:
        return _decode_lossless(payload, dtype, shape)
    return _decode_lossy(payload, dtype, shape, LEVELS[level], group)


def error_bound(buf: bytes) -> torch.Tensor:
    """[layers, channels] largest absolute error `decode(buf)` may have (0: lossless)."""
    (level, _, _, (L, _, C)), payload = _check(buf)
    if level == LOSSLESS:
        return torch.zeros(L, C)
    stats = _read_stats(payload, L, C)
    anchor, delta = _steps(stats[1], LEVELS[level])
    return torch.from_numpy(np.maximum(anchor, delta) / 2)


# ---- validation -----------------------------------------------------------------
def _check(buf: bytes):
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(buf).__name__}")
    buf = bytes(buf)
    if len(buf) < HEADER.size:
        raise CodecError(f"truncated: {len(buf)} bytes, a header alone is {HEADER.size}")
    magic, version, level, dtype, group, L, T, C, length, crc = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise CodecError("not a droidspeak KV chunk (bad magic)")
    if version != VERSION:
        raise CodecError(f"chunk format version {version}, this build reads {VERSION}")
    if level != LOSSLESS and level not in LEVELS:
        raise CodecError(f"unknown level {level}")
    if dtype not in DTYPES:
        raise CodecError(f"unknown dtype code {dtype}")
    if group < 1 or min(L, T, C) < 1 or L * T * C > MAX_ELEMENTS:
        raise CodecError(f"bad shape or group: [{L}, {T}, {C}], group {group}")
    if len(buf) != HEADER.size + length:
        raise CodecError(f"truncated or padded: {len(buf) - HEADER.size} payload bytes, header says {length}")
    payload = buf[HEADER.size:]
    if zlib.crc32(payload, zlib.crc32(buf[:HEADER.size - 4])) != crc:
        raise CodecError("checksum mismatch: the chunk is corrupt")
    return (level, DTYPES[dtype], group, (L, T, C)), payload


class _Reader:
    def __init__(self, payload: bytes):
        self.buf, self.pos = payload, 0

    def take(self, dtype, count: int) -> np.ndarray:
        n = np.dtype(dtype).itemsize * count
        if count < 0 or self.pos + n > len(self.buf):
            raise CodecError("payload ends early")
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += n
        return out

    def words(self) -> np.ndarray:
        (count,) = self.take("<u4", 1)
        return self.take("<u4", int(count)).astype(np.uint32)


def _words(compressed: np.ndarray) -> bytes:
    return struct.pack("<I", compressed.size) + compressed.astype("<u4").tobytes()


# ---- lossy ----------------------------------------------------------------------
def _steps(std: np.ndarray, level: Level) -> tuple[np.ndarray, np.ndarray]:
    L = std.shape[0]
    third = np.minimum(np.arange(L) * 3 // L, 2)
    delta = np.array(level.delta_steps, dtype=np.float32)[third][:, None] * std
    return (level.anchor_step * std).astype(np.float32), delta.astype(np.float32)


# Laplace scales (mean |symbol|) are rounded to this geometric grid; all (layer,
# channel) rows with one scale share one categorical table, so the coder runs a
# fixed model over long runs of symbols instead of a per-symbol parametric one.
SCALE_GRID = np.geomspace(0.05, 512.0, 64).astype(np.float32)
NO_SYMBOLS = 0xFF


def _read_stats(payload: bytes, L: int, C: int) -> np.ndarray:
    """[2, L, C] float32: mean and std (stored as fp16)."""
    return _Reader(payload).take("<f2", 2 * L * C).astype(np.float32).reshape(2, L, C)


def _bucket(symbols: np.ndarray) -> np.ndarray:
    """[rows] grid index of each row's Laplace scale; symbols [rows, n]."""
    scale = np.maximum(np.abs(symbols).mean(axis=1), SCALE_GRID[0])
    return np.clip(np.searchsorted(SCALE_GRID, scale), 0, SCALE_GRID.size - 1).astype(np.uint8)


def _table(bucket: int, lo: int, hi: int) -> "constriction.stream.model.Categorical":
    x = np.arange(lo, max(hi, lo + 1) + 1, dtype=np.float64)  # the coder needs two symbols at least
    logp = -np.abs(x) / float(SCALE_GRID[bucket])
    p = np.exp(logp - logp.max())  # symbols far from 0 (an offset row) must not underflow
    return constriction.stream.model.Categorical(p / p.sum(), perfect=False)


def _rows_code(rows: np.ndarray) -> bytes:
    """rows [R, n] int symbols (one row per (layer, channel)): each row's scale
    bucket, then per bucket its symbol range, then one range-coded stream."""
    buckets = _bucket(rows) if rows.shape[1] else np.full(rows.shape[0], NO_SYMBOLS, np.uint8)
    enc = constriction.stream.queue.RangeEncoder()
    ranges = []
    for b in np.unique(buckets) if rows.shape[1] else ():
        sym = rows[buckets == b].ravel()
        lo, hi = int(sym.min()), int(sym.max())
        ranges.append(struct.pack("<Bii", int(b), lo, hi))
        enc.encode((sym - lo).astype(np.int32), _table(int(b), lo, hi))
    return (buckets.tobytes() + struct.pack("<H", len(ranges)) + b"".join(ranges)
            + _words(enc.get_compressed()))


def _rows_decode(reader: _Reader, num_rows: int, n: int) -> np.ndarray:
    buckets = reader.take("<u1", num_rows)
    (count,) = reader.take("<u2", 1)
    specs = [(int(b), int(lo), int(hi)) for b, lo, hi in
             (struct.unpack("<Bii", reader.take("<u1", 9).tobytes()) for _ in range(int(count)))]
    words = reader.words()
    out = np.zeros((num_rows, n), dtype=np.int64)
    if n == 0:
        return out
    present = np.unique(buckets)
    if [b for b, _, _ in specs] != present.tolist() or any(lo > hi or b >= SCALE_GRID.size for b, lo, hi in specs):
        raise CodecError("symbol tables do not match the rows")
    dec = constriction.stream.queue.RangeDecoder(words)
    try:
        for b, lo, hi in specs:
            mask = buckets == b
            out[mask] = dec.decode(_table(b, lo, hi), int(mask.sum()) * n).reshape(-1, n) + lo
    except Exception as e:  # the coder rejects streams it cannot decode
        raise CodecError(f"entropy-coded data is invalid: {e}") from None
    return out


def _encode_lossy(x: torch.Tensor, level: Level, group: int) -> bytes:
    v = x.float().numpy()
    L, T, C = v.shape
    mean = v.mean(axis=1).astype(np.float16).astype(np.float32)
    std = np.maximum(v.std(axis=1), MIN_STD).astype(np.float16).astype(np.float32)
    anchor_step, delta_step = _steps(std, level)
    anchors = v[:, ::group]                                        # [L, nA, C]
    a_sym = np.rint((anchors - mean[:, None]) / anchor_step[:, None]).astype(np.int64)
    a_hat = mean[:, None] + a_sym * anchor_step[:, None]
    owner = np.repeat(a_hat, group, axis=1)[:, :T]                 # each token's anchor, dequantized
    mask = np.arange(T) % group != 0
    d_sym = np.rint((v[:, mask] - owner[:, mask]) / delta_step[:, None]).astype(np.int64)
    stats = np.stack([mean, std]).astype("<f2")
    rows = lambda s: s.transpose(0, 2, 1).reshape(L * C, -1)       # noqa: E731  [(layer, channel), tokens]
    return stats.tobytes() + _rows_code(rows(a_sym)) + _rows_code(rows(d_sym))


def _decode_lossy(payload: bytes, dtype: torch.dtype, shape, level: Level, group: int) -> torch.Tensor:
    L, T, C = shape
    reader = _Reader(payload)
    mean, std = reader.take("<f2", 2 * L * C).astype(np.float32).reshape(2, L, C)
    if not (np.isfinite(std).all() and (std > 0).all() and np.isfinite(mean).all()):
        raise CodecError("bad quantization statistics")
    anchor_step, delta_step = _steps(std, level)
    n_anchor = (T + group - 1) // group
    mask = np.arange(T) % group != 0
    n_delta = int(mask.sum())
    cols = lambda r, n: r.reshape(L, C, n).transpose(0, 2, 1)      # noqa: E731
    a_sym = cols(_rows_decode(reader, L * C, n_anchor), n_anchor)
    d_sym = cols(_rows_decode(reader, L * C, n_delta), n_delta)
    if reader.pos != len(payload):
        raise CodecError("payload has trailing bytes")
    a_hat = mean[:, None] + a_sym * anchor_step[:, None]
    out = np.repeat(a_hat, group, axis=1)[:, :T].astype(np.float32)
    out[:, mask] += d_sym * delta_step[:, None]
    return torch.from_numpy(out).to(dtype)


# ---- lossless -------------------------------------------------------------------
def _planes(x: torch.Tensor) -> np.ndarray:
    """[L, bytes per element, T * C] uint8 byte planes of the raw values."""
    raw = x.view(torch.uint8).numpy() if x.dtype != torch.bfloat16 else x.view(torch.int16).numpy().view(np.uint8)
    L = x.shape[0]
    return raw.reshape(L, -1, x.element_size()).transpose(0, 2, 1)


RAW_PLANE, CODED_PLANE = 0, 1


def _encode_lossless(x: torch.Tensor) -> bytes:
    planes = _planes(x)
    out = []
    for layer in planes:
        for plane in layer:
            counts = np.bincount(plane, minlength=256)
            present = np.flatnonzero(counts)
            enc = constriction.stream.queue.RangeEncoder()
            enc.encode(plane.astype(np.int32), constriction.stream.model.Categorical(
                counts / counts.sum(), perfect=False))
            coded = (struct.pack("<H", present.size) + present.astype("<u1").tobytes()
                     + counts[present].astype("<u4").tobytes() + _words(enc.get_compressed()))
            if len(coded) < plane.size:
                out.append(bytes([CODED_PLANE]) + coded)
            else:
                out.append(bytes([RAW_PLANE]) + plane.tobytes())
    return b"".join(out)


def _decode_lossless(payload: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    L, T, C = shape
    size = torch.empty((), dtype=dtype).element_size()
    reader = _Reader(payload)
    planes = np.empty((L, size, T * C), dtype=np.uint8)
    for layer in range(L):
        for p in range(size):
            (kind,) = reader.take("<u1", 1)
            if kind == RAW_PLANE:
                planes[layer, p] = reader.take("<u1", T * C)
                continue
            if kind != CODED_PLANE:
                raise CodecError(f"unknown byte-plane kind {kind}")
            (n,) = reader.take("<u2", 1)
            present = reader.take("<u1", int(n)).astype(np.int64)
            counts = np.zeros(256)
            counts[present] = reader.take("<u4", int(n))
            words = reader.words()
            if counts.sum() != T * C:
                raise CodecError("byte-plane counts do not match the shape")
            try:
                sym = constriction.stream.queue.RangeDecoder(words).decode(
                    constriction.stream.model.Categorical(counts / counts.sum(), perfect=False), T * C)
            except Exception as e:
                raise CodecError(f"entropy-coded data is invalid: {e}") from None
            planes[layer, p] = sym
    if reader.pos != len(payload):
        raise CodecError("payload has trailing bytes")
    raw = np.ascontiguousarray(planes.transpose(0, 2, 1)).reshape(-1)
    if dtype == torch.bfloat16:
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).reshape(L, T, C)
    return torch.from_numpy(raw.view(np.float32 if dtype == torch.float32 else np.float16).copy()).reshape(L, T, C)
