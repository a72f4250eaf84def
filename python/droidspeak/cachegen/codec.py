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

A chunk may hold a range of a model's layers (the store keeps KV in layer parts,
so that loading can run ahead of compute layer by layer): the header names the
first layer and the model's layer count, and the step schedule is the model's,
not the part's.

With a codec profile (`transform.py`, made per model by `calibrate.py`), a
lossy level codes KV rows in the profile's coordinates instead: importance-
whitened and decorrelated per layer's K and V, one step for every coefficient,
and no anchors (`group` 1: on SmolLM2-135M deltas between tokens are as large as
the values, and grouping made chunks 12% larger at equal quality). The chunk
names the profile (its 64-bit tag); decoding it takes the same profile. Such a
chunk also carries one byte per token, c: that token's step is the level's /
2^(c / 4). The encoder takes them from the profile's sink detector (finer steps
for the model's attention sinks; `transform.py`), computed on all of a chunk's
layers, so every layer part of a chunk codes its tokens alike.

Format (little-endian): magic "DSKV", version, level, dtype, coder, group size,
first layer, model layers, shape, exact tokens, codec-profile tag (0: none),
payload length, CRC-32 of everything after the CRC field, payload (a lossy chunk's
exact tokens as they are first). `decode` checks all of it
before trusting a byte, and never unpickles.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import constriction
import numpy as np
import torch

from droidspeak import kernels
from droidspeak.cachegen.transform import TOKEN_SCALE_CODE_MAX, CodecProfile
from droidspeak.kernels import native_available

MAGIC = b"DSKV"
VERSION = 8  # 8: per-token step codes in profiled chunks
# magic, version, level, dtype, coder, group, first layer, model layers, L, T, C, exact tokens, profile tag,
# payload length, crc
HEADER = struct.Struct("<4sHBBBHHHIIIHQII")
CODER_RANGE, CODER_RANS = 0, 1  # constriction's range coder; our rANS (csrc/rans.cpp)
DEFAULT_GROUP = 10
MAX_ELEMENTS = 1 << 31
MIN_STD = 1e-4  # channels with (near) constant values still get a usable step


@dataclass(frozen=True)
class Level:
    name: str
    anchor_step: float                     # x channel std
    delta_steps: tuple[float, float, float]  # x channel std, for the first / middle / last third of layers
    coefficient_step: float                # with a codec profile: the one step of every coefficient


LOSSLESS = 0
LEVELS = {
    1: Level("high", 0.02, (0.04, 0.06, 0.08), 0.1),
    2: Level("medium", 0.04, (0.08, 0.12, 0.16), 0.2),
    3: Level("low", 0.08, (0.16, 0.24, 0.32), 0.32),
}
LEVEL_NAMES = {"lossless": LOSSLESS, **{lv.name: i for i, lv in LEVELS.items()}}
DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


class CodecError(ValueError):
    """Bytes that are not a valid chunk of this codec (corrupt, truncated, foreign)."""


def default_coder() -> int:
    return CODER_RANS if native_available() else CODER_RANGE


def encode(x: torch.Tensor, level: int | str = "medium", group: int | None = None,
           coder: int | None = None, layers: tuple[int, int] | None = None,
           profile: CodecProfile | None = None, exact_tokens: int = 0,
           token_scales: np.ndarray | None = None) -> bytes:
    """Encode `x` [layers, tokens, channels] (fp32, bf16 or fp16) at `level`, with
    the native rANS coder when the extension is built (else constriction's).
    `layers` = (first layer, the model's layer count) when `x` holds a part of a
    model's layers (default: all of them). A lossy level codes KV rows in
    `profile`'s coordinates when one is given (`group` then defaults to 1, else
    to DEFAULT_GROUP); the lossless level ignores it. A lossy level stores the
    first `exact_tokens` tokens as they are: give 1 for a chunk that starts a
    prompt, whose first token is the model's attention sink (every later token
    attends to it, so its error costs the most: docs/kv-store.md). With a profile, `token_scales` ([tokens] uint8,
    from `token_scales(...)` on the chunk's whole KV) refines each token's step;
    by default they are computed from `x` when it holds the layers the profile's
    sink detector reads, else every step is the level's."""
    level = LEVEL_NAMES[level] if isinstance(level, str) else level
    if level != LOSSLESS and level not in LEVELS:
        raise ValueError(f"unknown level {level}; levels: {sorted(LEVEL_NAMES)}")
    if x.dim() != 3 or x.dtype not in DTYPE_CODES:
        raise ValueError(f"expected a [layers, tokens, channels] tensor of {sorted(map(str, DTYPE_CODES))}")
    if level == LOSSLESS:
        profile, exact_tokens = None, 0
    if not 0 <= exact_tokens <= min(x.shape[1], 0xFFFF):
        raise ValueError(f"exact_tokens must be in [0, {x.shape[1]}], got {exact_tokens}")
    group = (1 if profile is not None else DEFAULT_GROUP) if group is None else group
    if not 1 <= group <= 0xFFFF:
        raise ValueError("group must be in [1, 65535]")
    coder = default_coder() if coder is None else coder
    if coder == CODER_RANS and not native_available():
        raise ValueError("the rANS coder needs the native extension droidspeak._C")
    L, T, C = x.shape
    first, total = layers or (0, L)
    if not (0 <= first and first + L <= total <= 0xFFFF):
        raise ValueError(f"layers {layers} do not hold a part of {L} layers")
    if profile is not None:
        profile.check(first, L, total, C)
    x = x.detach().cpu().contiguous()
    if level == LOSSLESS:
        payload = _encode_lossless(x, coder)
    else:
        rest = x[:, exact_tokens:].contiguous()
        payload = _raw_bytes(x[:, :exact_tokens].contiguous())
        if rest.shape[1] and profile is not None:
            if token_scales is None:
                token_scales = _default_token_scales(x, profile, first)
            token_scales = np.asarray(token_scales)
            if token_scales.shape != (T,) or token_scales.dtype != np.uint8 \
                    or int(token_scales.max(initial=0)) > TOKEN_SCALE_CODE_MAX:
                raise ValueError(f"token_scales must be [{T}] uint8 codes of at most {TOKEN_SCALE_CODE_MAX}")
            payload += _encode_coefficients(rest, LEVELS[level], group, coder, first, profile,
                                            token_scales[exact_tokens:])
        elif rest.shape[1]:
            payload += _encode_lossy(rest, LEVELS[level], group, coder, first, total)
    tag = 0 if profile is None else profile.tag
    body = HEADER.pack(MAGIC, VERSION, level, DTYPE_CODES[x.dtype], coder, group, first, total, L, T, C,
                       exact_tokens, tag, len(payload), 0)[:-4]
    crc = zlib.crc32(payload, zlib.crc32(body))
    return body + struct.pack("<I", crc) + payload


def token_scales(kv: torch.Tensor, profile: CodecProfile, first: int = 0) -> np.ndarray:
    """[tokens] uint8 step codes for a chunk from its KV `kv` [layers, tokens,
    channels] of layers first.., which must include the profile's sink layers."""
    if not _holds_sink_layers(profile, first, kv.shape[0]):
        raise ValueError(f"the sink detector reads layers {profile.sink_layers.tolist()}; "
                         f"the KV holds {first}..{first + kv.shape[0]}")
    layers = profile.sink_layers - first
    if not layers.size:
        return np.zeros(kv.shape[1], dtype=np.uint8)
    kv, C = kv.detach().cpu(), kv.shape[2] // 2
    return profile.token_scale_codes(np.stack([_as_float32(kv[i, :, C:]) for i in layers]))  # numpy, as the codec


def _default_token_scales(x: torch.Tensor, profile: CodecProfile, first: int) -> np.ndarray:
    if not _holds_sink_layers(profile, first, x.shape[0]):
        return np.zeros(x.shape[1], dtype=np.uint8)  # a part without them: the caller did not pass its codes
    return token_scales(x, profile, first)


def _holds_sink_layers(profile: CodecProfile, first: int, layers: int) -> bool:
    return bool(((profile.sink_layers >= first) & (profile.sink_layers < first + layers)).all())


def decode(buf: bytes, profile: CodecProfile | None = None) -> torch.Tensor:
    """The tensor `buf` holds; a chunk coded with a codec profile needs the same
    profile (CodecError otherwise)."""
    header, payload = _check(buf)
    level, dtype, coder, group, layers, shape, tag, exact = header
    if level == LOSSLESS:
        return _decode_lossless(payload, dtype, shape, coder)
    L, T, C = shape
    head = _from_raw_bytes(payload, dtype, (L, exact, C))
    payload, rest = payload[head.nbytes:], (L, T - exact, C)
    if not rest[1]:
        if payload:
            raise CodecError("payload has trailing bytes")
        return _as_tensor(head, dtype)
    if tag:
        tail = _decode_coefficients(payload, dtype, rest, LEVELS[level], group, coder, layers[0],
                                    _profile_for(tag, profile, layers, shape))
    else:
        tail = _decode_lossy(payload, dtype, rest, LEVELS[level], group, coder, *layers)
    if not exact:
        return tail
    # joined by numpy: the codec's threads run no torch op (see _as_float32)
    tail_raw = tail.view(torch.int16).numpy() if dtype == torch.bfloat16 else tail.numpy()
    return _as_tensor(np.concatenate([head, tail_raw], axis=1), dtype)


def profile_tag(buf: bytes) -> int:
    """The codec-profile tag a (valid) chunk was coded with, 0 for none."""
    return _check(buf)[0][6]


def chunk_token_scales(buf: bytes) -> np.ndarray:
    """The step codes a (valid) chunk's tokens were coded with: [tokens] uint8,
    0 for its exact tokens and for every token of a chunk without a profile."""
    (level, dtype, _, _, _, (L, T, C), tag, exact), payload = _check(buf)
    codes = np.zeros(T, dtype=np.uint8)
    if tag and exact < T:
        start = L * exact * C * np.dtype(_NUMPY_OF[dtype]).itemsize
        codes[exact:] = _Reader(payload[start:]).take("<u1", T - exact)
    return codes


def _raw_bytes(x: torch.Tensor) -> bytes:
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy().tobytes()


_NUMPY_OF = {torch.bfloat16: np.int16, torch.float16: np.float16, torch.float32: np.float32}


def _from_raw_bytes(payload: bytes, dtype: torch.dtype, shape) -> np.ndarray:
    """Tokens stored as they are, from the payload's start, as numpy (bf16 as its
    int16 bits); checked finite, as everything read from a peer."""
    n = shape[0] * shape[1] * shape[2]
    size = np.dtype(_NUMPY_OF[dtype]).itemsize
    if len(payload) < n * size:
        raise CodecError("payload ends early")
    out = np.frombuffer(payload, dtype=_NUMPY_OF[dtype], count=n).reshape(shape).copy()
    if not np.isfinite(_as_float32(_as_tensor(out, dtype))).all():
        raise CodecError("non-finite values among the exact tokens")
    return out


def _as_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def error_bound(buf: bytes, profile: CodecProfile | None = None) -> torch.Tensor:
    """[layers, channels] largest absolute error `decode(buf, profile)` may have
    (0: lossless; the exact tokens have none, the bound is the other tokens';
    a token with a step code c is within the bound / 2^(c / 4))."""
    (level, dtype, _, _, layers, (L, T, C), tag, exact), payload = _check(buf)
    if level == LOSSLESS or exact == T:
        return torch.zeros(L, C)
    payload = payload[L * exact * C * np.dtype(_NUMPY_OF[dtype]).itemsize:]
    if tag:
        profile = _profile_for(tag, profile, layers, (L, 0, C))
        return torch.from_numpy(profile.error_bound(LEVELS[level].coefficient_step, layers[0], L))
    stats = _read_stats(payload, L, C)
    anchor, delta = _steps(stats[1], LEVELS[level], *layers)
    return torch.from_numpy(np.maximum(anchor, delta) / 2)


def _profile_for(tag: int, profile: CodecProfile | None, layers: tuple[int, int], shape) -> CodecProfile:
    if profile is None:
        raise CodecError(f"this chunk was coded with codec profile {tag:016x}, and none was given")
    if profile.tag != tag:
        raise CodecError(f"this chunk was coded with codec profile {tag:016x}, not with {profile.tag:016x}")
    try:
        profile.check(layers[0], shape[0], layers[1], shape[2])
    except ValueError as e:
        raise CodecError(str(e)) from None
    return profile


# ---- validation -----------------------------------------------------------------
def _check(buf: bytes):
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(buf).__name__}")
    buf = bytes(buf)
    if len(buf) < HEADER.size:
        raise CodecError(f"truncated: {len(buf)} bytes, a header alone is {HEADER.size}")
    magic, version, level, dtype, coder, group, first, total, L, T, C, exact, tag, length, crc = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise CodecError("not a droidspeak KV chunk (bad magic)")
    if version != VERSION:
        raise CodecError(f"chunk format version {version}, this build reads {VERSION}")
    if level != LOSSLESS and level not in LEVELS:
        raise CodecError(f"unknown level {level}")
    if dtype not in DTYPES:
        raise CodecError(f"unknown dtype code {dtype}")
    if coder not in (CODER_RANGE, CODER_RANS):
        raise CodecError(f"unknown entropy coder {coder}")
    if coder == CODER_RANS and not native_available():
        raise CodecError("this chunk was coded with droidspeak's native rANS coder, and the extension "
                         "droidspeak._C is not built here")
    if group < 1 or min(L, T, C) < 1 or L * T * C > MAX_ELEMENTS:
        raise CodecError(f"bad shape or group: [{L}, {T}, {C}], group {group}")
    if first + L > total:
        raise CodecError(f"layers {first}..{first + L} of a {total}-layer model")
    if tag and (level == LOSSLESS or C % 2):
        raise CodecError("a codec-profile tag on a chunk that cannot have one")
    if exact > T or (exact and level == LOSSLESS):
        raise CodecError(f"{exact} exact tokens in a chunk of {T}")
    if len(buf) != HEADER.size + length:
        raise CodecError(f"truncated or padded: {len(buf) - HEADER.size} payload bytes, header says {length}")
    payload = buf[HEADER.size:]
    if zlib.crc32(payload, zlib.crc32(buf[:HEADER.size - 4])) != crc:
        raise CodecError("checksum mismatch: the chunk is corrupt")
    return (level, DTYPES[dtype], coder, group, (first, total), (L, T, C), tag, exact), payload


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
def _steps(std: np.ndarray, level: Level, first: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps of layers [first, first + len(std)) of a `total`-layer model."""
    L = std.shape[0]
    third = np.minimum((first + np.arange(L)) * 3 // total, 2)
    delta = np.array(level.delta_steps, dtype=np.float32)[third][:, None] * std
    return (level.anchor_step * std).astype(np.float32), delta.astype(np.float32)


# ---- entropy coding of symbol segments ------------------------------------------
# Rows of a lossy level are grouped by their Laplace scale (mean |symbol|, rounded
# to this geometric grid); each group (and each byte plane of the lossless level)
# is a *segment* coded with its own frequency table, stored with the chunk.
SCALE_GRID = np.geomspace(0.05, 512.0, 48).astype(np.float32)
NO_SYMBOLS = 0xFF
TABLE_BITS = 15
TABLE_TOTAL = 1 << TABLE_BITS
MAX_ALPHABET = 4096        # wider segments are stored raw
RAW, CODED, CONSTANT = 0, 1, 2  # CONSTANT: every symbol equals lo, nothing stored
SEGMENT = struct.Struct("<BBii")  # mode, raw width (bytes), lo, hi


def _read_stats(payload: bytes, L: int, C: int) -> np.ndarray:
    """[2, L, C] float32: mean and std (stored as fp16)."""
    return _Reader(payload).take("<f2", 2 * L * C).astype(np.float32).reshape(2, L, C)


def _normalize(counts: np.ndarray) -> np.ndarray:
    """Frequencies summing to 2^15, at least 1 for every symbol that occurs."""
    f = np.floor(counts * (TABLE_TOTAL / counts.sum())).astype(np.int64)
    f[(counts > 0) & (f == 0)] = 1
    diff = TABLE_TOTAL - int(f.sum())
    if diff > 0:
        f[int(np.argmax(counts))] += diff
    else:
        for i in np.argsort(-f):
            take = min(int(f[i]) - 1, -diff)
            f[i] -= take
            diff += take
            if diff == 0:
                break
    return f


def _raw_width(lo: int, hi: int) -> int:
    span = hi - lo
    return 1 if span < 1 << 8 else 2 if span < 1 << 16 else 4


_RAW_DTYPE = {1: "<u1", 2: "<u2", 4: "<u4"}


def _code_segments(segments: list[np.ndarray], coder: int) -> bytes:
    """Each segment (int array) as a table + coded symbols, or raw where coding
    would not make it smaller; all coded segments share one stream."""
    specs, raws, coded, lens, tables = [], [], [], [], []
    for seg in segments:
        if seg.size == 0:
            specs.append(SEGMENT.pack(RAW, 1, 0, 0))
            continue
        lo, hi = int(seg.min()), int(seg.max())
        if lo == hi:
            specs.append(SEGMENT.pack(CONSTANT, 0, lo, hi))
            continue
        width = _raw_width(lo, hi)
        sym = seg - lo
        if hi - lo < MAX_ALPHABET:
            counts = np.bincount(sym.ravel(), minlength=hi - lo + 1)
            freqs = _normalize(counts)
            present = counts > 0
            bits = -(counts[present] * np.log2(freqs[present] / TABLE_TOTAL)).sum()
            if bits / 8 + 2 * freqs.size < seg.size * width:
                specs.append(SEGMENT.pack(CODED, 0, lo, hi) + freqs.astype("<u2").tobytes())
                coded.append(sym.ravel().astype(np.int32))
                lens.append(seg.size)
                tables.append(freqs.astype(np.int32))
                continue
        specs.append(SEGMENT.pack(RAW, width, lo, hi))
        raws.append(sym.ravel().astype(_RAW_DTYPE[width]).tobytes())
    stream = _entropy_encode(coded, lens, tables, coder) if coded else b""
    return (struct.pack("<I", len(segments)) + b"".join(specs) + b"".join(raws)
            + struct.pack("<I", len(stream)) + stream)


def _decode_segments(reader: _Reader, sizes: list[int], coder: int) -> list[np.ndarray]:
    (count,) = reader.take("<u4", 1)
    if count != len(sizes):
        raise CodecError(f"{count} symbol segments, the shape needs {len(sizes)}")
    specs = []
    for size in sizes:
        mode, width, lo, hi = SEGMENT.unpack(reader.take("<u1", SEGMENT.size).tobytes())
        if lo > hi or (size and mode == CODED and hi - lo >= MAX_ALPHABET) or mode not in (RAW, CODED, CONSTANT) \
                or (mode == RAW and width not in _RAW_DTYPE) or (mode == CONSTANT and lo != hi):
            raise CodecError("bad symbol segment header")
        freqs = reader.take("<u2", hi - lo + 1).astype(np.int32) if mode == CODED else None
        if freqs is not None and int(freqs.sum()) != TABLE_TOTAL:
            raise CodecError("a frequency table does not sum to 2^15")
        specs.append((mode, width, lo, freqs))
    out: list[np.ndarray | None] = []
    for (mode, width, lo, _), size in zip(specs, sizes):
        if mode == RAW:
            out.append(reader.take(_RAW_DTYPE[width], size).astype(np.int64) + lo)
        else:
            out.append(np.full(size, lo, dtype=np.int64) if mode == CONSTANT else None)
    (n,) = reader.take("<u4", 1)
    stream = reader.take("<u1", int(n))
    coded = [(i, size, spec) for i, (spec, size) in enumerate(zip(specs, sizes)) if spec[0] == CODED]
    if coded:
        flat = _entropy_decode(stream, [size for _, size, _ in coded], [spec[3] for _, _, spec in coded], coder)
        pos = 0
        for i, size, spec in coded:
            out[i] = np.add(flat[pos:pos + size], spec[2], dtype=np.int64)
            pos += size
    elif n:
        raise CodecError("an entropy-coded stream with no coded segment")
    return out


def _entropy_encode(symbols: list[np.ndarray], lens: list[int], tables: list[np.ndarray], coder: int) -> bytes:
    if coder == CODER_RANS:
        return kernels.rans_encode(torch.from_numpy(np.concatenate(symbols)), torch.tensor(lens, dtype=torch.int64),
                                   torch.from_numpy(np.concatenate(tables)),
                                   torch.tensor([t.size for t in tables], dtype=torch.int64)).numpy().tobytes()
    enc = constriction.stream.queue.RangeEncoder()
    for sym, table in zip(symbols, tables):
        enc.encode(sym, constriction.stream.model.Categorical(table / TABLE_TOTAL, perfect=False))
    return enc.get_compressed().astype("<u4").tobytes()


def _entropy_decode(stream: np.ndarray, lens: list[int], tables: list[np.ndarray], coder: int) -> np.ndarray:
    try:
        if coder == CODER_RANS:
            return kernels.rans_decode(torch.from_numpy(stream.copy()), torch.tensor(lens, dtype=torch.int64),
                                       torch.from_numpy(np.concatenate(tables)),
                                       torch.tensor([t.size for t in tables], dtype=torch.int64)).numpy()
        if stream.size % 4:
            raise ValueError("range-coder stream is not whole words")
        dec = constriction.stream.queue.RangeDecoder(stream.view("<u4").astype(np.uint32))
        return np.concatenate([dec.decode(constriction.stream.model.Categorical(t / TABLE_TOTAL, perfect=False), n)
                               for t, n in zip(tables, lens)])
    except Exception as e:  # the coders reject streams they cannot decode (constriction asserts)
        raise CodecError(f"entropy-coded data is invalid: {e}") from None


def _bucket(rows: np.ndarray) -> np.ndarray:
    """[rows] grid index of each row's Laplace scale; rows [R, n]."""
    if rows.shape[1] == 0:
        return np.full(rows.shape[0], NO_SYMBOLS, np.uint8)
    scale = np.maximum(np.abs(rows).mean(axis=1), SCALE_GRID[0])
    return np.clip(np.searchsorted(SCALE_GRID, scale), 0, SCALE_GRID.size - 1).astype(np.uint8)


def _rows_code(rows: np.ndarray, coder: int) -> bytes:
    """rows [R, n] (one per (layer, channel)): each row's scale bucket, then one
    segment per bucket present."""
    buckets = _bucket(rows)
    present = np.unique(buckets) if rows.shape[1] else np.zeros(0, np.uint8)
    return buckets.tobytes() + _code_segments([rows[buckets == b] for b in present], coder)


def _rows_decode(reader: _Reader, num_rows: int, n: int, coder: int) -> tuple[np.ndarray, np.ndarray]:
    """(symbol rows [num_rows, n] in bucket order, index [num_rows]): row r of the
    chunk is row index[r] of the first. Segment b holds the rows of bucket b in row
    order, so the rows of a stable sort by bucket line up with the segments."""
    buckets = reader.take("<u1", num_rows)
    if n == 0:
        _decode_segments(reader, [], coder)
        return np.zeros((num_rows, 0), dtype=np.int64), np.arange(num_rows, dtype=np.int64)
    if int(buckets.max(initial=0)) >= SCALE_GRID.size:
        raise CodecError("bad scale bucket")
    _, counts = np.unique(buckets, return_counts=True)
    segs = _decode_segments(reader, [int(k) * n for k in counts], coder)
    index = np.empty(num_rows, dtype=np.int64)
    index[np.argsort(buckets, kind="stable")] = np.arange(num_rows)
    return np.concatenate(segs).reshape(num_rows, n), index


# ---- lossy ----------------------------------------------------------------------
def _as_float32(x: torch.Tensor) -> np.ndarray:
    """fp32 values of a CPU tensor, widened by numpy. The codec runs on the KV
    store's background threads, where a torch op would start a second OpenMP team
    that competes with the engine's forward passes."""
    if x.dtype == torch.bfloat16:
        return (x.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return x.numpy().astype(np.float32, copy=False)


def _from_float32(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """`a` (finite fp32) as a tensor of `dtype`, narrowed without torch's parallel
    ops (see _as_float32): bf16 by the native single-threaded op, or numpy without
    the extension, with round-to-nearest-even as torch rounds."""
    if dtype == torch.bfloat16 and native_available():
        return kernels.fp32_to_bf16(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
    if dtype == torch.bfloat16:
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        return torch.from_numpy(rounded.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float16 if dtype == torch.float16 else np.float32))


def _encode_lossy(x: torch.Tensor, level: Level, group: int, coder: int, first: int, total: int) -> bytes:
    v = _as_float32(x)
    mean = v.mean(axis=1).astype(np.float16).astype(np.float32)
    std = np.maximum(v.std(axis=1), MIN_STD).astype(np.float16).astype(np.float32)
    anchor_step, delta_step = _steps(std, level, first, total)
    stats = np.stack([mean, std]).astype("<f2")
    return stats.tobytes() + _quantize(v, mean, anchor_step, delta_step, group, coder)


def _encode_coefficients(x: torch.Tensor, level: Level, group: int, coder: int, first: int,
                         profile: CodecProfile, codes: np.ndarray) -> bytes:
    """No statistics travel: the profile centres the coefficients and the level
    sets the step, which each token's code refines (coefficients scaled up)."""
    z = profile.to_coefficients(_as_float32(x), first)
    if codes.any():
        z *= _code_scales(codes)[None, :, None]
    step = np.full(z.shape[::2], level.coefficient_step, dtype=np.float32)
    return codes.tobytes() + _quantize(z, np.zeros_like(step), step, step, group, coder)


def _code_scales(codes: np.ndarray) -> np.ndarray:
    return np.exp2(codes.astype(np.float32) / 4)


def _quantize(v: np.ndarray, mean: np.ndarray, anchor_step: np.ndarray, delta_step: np.ndarray,
              group: int, coder: int) -> bytes:
    """Anchor and delta symbols of `v` [L, T, C], entropy coded by (layer, channel) row."""
    L, T, C = v.shape
    anchors = v[:, ::group]                                        # [L, nA, C]
    a_sym = np.rint((anchors - mean[:, None]) / anchor_step[:, None]).astype(np.int64)
    a_hat = mean[:, None] + a_sym * anchor_step[:, None]
    owner = np.repeat(a_hat, group, axis=1)[:, :T]                 # each token's anchor, dequantized
    mask = np.arange(T) % group != 0
    d_sym = np.rint((v[:, mask] - owner[:, mask]) / delta_step[:, None]).astype(np.int64)
    rows = lambda s: s.transpose(0, 2, 1).reshape(L * C, -1)       # noqa: E731  [(layer, channel), tokens]
    return _rows_code(rows(a_sym), coder) + _rows_code(rows(d_sym), coder)


def _decode_lossy(payload: bytes, dtype: torch.dtype, shape, level: Level, group: int, coder: int,
                  first: int, total: int) -> torch.Tensor:
    L, T, C = shape
    reader = _Reader(payload)
    mean, std = reader.take("<f2", 2 * L * C).astype(np.float32).reshape(2, L, C)
    if not (np.isfinite(std).all() and (std > 0).all() and np.isfinite(mean).all()):
        raise CodecError("bad quantization statistics")
    anchor_step, delta_step = _steps(std, level, first, total)
    return _from_float32(_unquantize(reader, shape, mean, anchor_step, delta_step, group, coder), dtype)


def _decode_coefficients(payload: bytes, dtype: torch.dtype, shape, level: Level, group: int, coder: int,
                         first: int, profile: CodecProfile) -> torch.Tensor:
    L, T, C = shape
    reader = _Reader(payload)
    codes = reader.take("<u1", T)
    if int(codes.max(initial=0)) > TOKEN_SCALE_CODE_MAX:
        raise CodecError("bad token step code")
    step = np.full((L, C), level.coefficient_step, dtype=np.float32)
    z = _unquantize(reader, shape, np.zeros_like(step), step, step, group, coder)
    if codes.any():
        z /= _code_scales(codes)[None, :, None]
    return _from_float32(profile.from_coefficients(z, first), dtype)


def _unquantize(reader: _Reader, shape, mean: np.ndarray, anchor_step: np.ndarray, delta_step: np.ndarray,
                group: int, coder: int) -> np.ndarray:
    """[L, T, C] fp32 values from the rest of the payload (its symbol rows)."""
    L, T, C = shape
    n_anchor = (T + group - 1) // group
    a_rows, a_index = _rows_decode(reader, L * C, n_anchor, coder)
    d_rows, d_index = _rows_decode(reader, L * C, T - n_anchor, coder)
    if reader.pos != len(reader.buf):
        raise CodecError("payload has trailing bytes")
    if native_available():
        return kernels.cachegen_dequantize(*map(torch.from_numpy, (a_rows, d_rows, a_index, d_index, mean,
                                                                    anchor_step, delta_step)), group, T).numpy()
    return _dequantize(a_rows[a_index], d_rows[d_index], mean, anchor_step, delta_step, group, T)


def _dequantize(a_rows: np.ndarray, d_rows: np.ndarray, mean: np.ndarray, anchor_step: np.ndarray,
                delta_step: np.ndarray, group: int, T: int) -> np.ndarray:
    """[L, T, C] fp32 values from the symbol rows [(layer, channel), anchors / deltas]
    (the reference of the native `cachegen_dequantize`, bit for bit)."""
    L, C = mean.shape
    mask = np.arange(T) % group != 0
    cols = lambda r: r.reshape(L, C, -1).transpose(0, 2, 1)        # noqa: E731
    a_hat = mean[:, None] + cols(a_rows) * anchor_step[:, None]
    out = np.repeat(a_hat, group, axis=1)[:, :T].astype(np.float32)
    out[:, mask] += cols(d_rows) * delta_step[:, None]
    return out


# ---- lossless -------------------------------------------------------------------
def _planes(x: torch.Tensor) -> np.ndarray:
    """[L, bytes per element, T * C] uint8 byte planes of the raw values."""
    raw = x.view(torch.uint8).numpy() if x.dtype != torch.bfloat16 else x.view(torch.int16).numpy().view(np.uint8)
    L = x.shape[0]
    return raw.reshape(L, -1, x.element_size()).transpose(0, 2, 1)


def _encode_lossless(x: torch.Tensor, coder: int) -> bytes:
    planes = _planes(x)
    return _code_segments([p.astype(np.int64) for layer in planes for p in layer], coder)


def _decode_lossless(payload: bytes, dtype: torch.dtype, shape, coder: int) -> torch.Tensor:
    L, T, C = shape
    size = torch.empty((), dtype=dtype).element_size()
    reader = _Reader(payload)
    segs = _decode_segments(reader, [T * C] * (L * size), coder)
    if reader.pos != len(payload):
        raise CodecError("payload has trailing bytes")
    if any(int(s.min(initial=0)) < 0 or int(s.max(initial=0)) > 255 for s in segs):
        raise CodecError("byte plane values outside 0..255")
    planes = np.stack(segs).astype(np.uint8).reshape(L, size, T * C)
    raw = np.ascontiguousarray(planes.transpose(0, 2, 1)).reshape(-1)
    if dtype == torch.bfloat16:
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).reshape(L, T, C)
    return torch.from_numpy(raw.view(np.float32 if dtype == torch.float32 else np.float16).copy()).reshape(L, T, C)
