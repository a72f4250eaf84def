"""The CacheGen KV codec: round trips within each level's bound, the lossless
level exact, and bad bytes refused with a clear error."""
import struct

import pytest
import torch

from droidspeak.cachegen import codec
from droidspeak.cachegen.codec import CODER_RANGE, CODER_RANS, HEADER, CodecError, decode, encode, error_bound

CODERS = [pytest.param(CODER_RANGE, id="range"), pytest.param(CODER_RANS, id="rans")]


def kv_like(L=6, T=57, C=48, dtype=torch.bfloat16, seed=0):
    """Smooth along tokens (as real KV is), different scale per layer and channel."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(L, 1, C, generator=g) * torch.rand(L, 1, C, generator=g) * 4
    walk = torch.randn(L, T, C, generator=g).cumsum(1) * 0.05
    return (base + walk + torch.randn(L, T, C, generator=g) * 0.02).to(dtype)


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_lossless_is_exact(dtype, coder):
    x = kv_like(L=4, T=256, C=128, dtype=dtype)
    buf = encode(x, "lossless", coder=coder)
    y = decode(buf)
    assert y.dtype == dtype and torch.equal(y.view(torch.uint8) if dtype != torch.bfloat16 else y.view(torch.int16),
                                            x.view(torch.uint8) if dtype != torch.bfloat16 else x.view(torch.int16))
    assert len(buf) < x.numel() * x.element_size()
    assert not error_bound(buf).any()


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("level", ["high", "medium", "low"])
@pytest.mark.parametrize("group", [1, 10, 64])
def test_lossy_round_trip_within_bound(level, group, coder):
    x = kv_like(dtype=torch.float32)
    buf = encode(x, level, group=group, coder=coder)
    y = decode(buf)
    bound = error_bound(buf)
    err = (y - x).abs().amax(dim=1)
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()
    assert bound.max() > 0


def test_levels_trade_size_for_error():
    x = kv_like(L=8, T=128, C=64)
    sizes = {lv: len(encode(x, lv)) for lv in ("lossless", "high", "medium", "low")}
    assert sizes["low"] < sizes["medium"] < sizes["high"] < sizes["lossless"] < x.numel() * 2
    errs = {lv: (decode(encode(x, lv)).float() - x.float()).abs().mean() for lv in ("high", "medium", "low")}
    assert errs["high"] < errs["medium"] < errs["low"]


def test_early_layers_get_finer_steps():
    x = torch.randn(6, 40, 16)
    x = (x / x.std(dim=1, keepdim=True)).contiguous()  # every channel has std 1
    bound = error_bound(encode(x, "medium"))
    assert bound[0].max() < bound[3].min() and bound[3].max() < bound[5].min()


def test_corrupt_truncated_and_foreign_bytes_are_refused():
    buf = encode(kv_like(), "medium")
    flipped = bytearray(buf)
    flipped[len(buf) // 2] ^= 0x40
    with pytest.raises(CodecError, match="checksum"):
        decode(bytes(flipped))
    with pytest.raises(CodecError, match="truncated"):
        decode(buf[:-3])
    with pytest.raises(CodecError, match="truncated"):
        decode(buf[:10])
    with pytest.raises(CodecError, match="not a droidspeak KV chunk"):
        decode(b"\x80\x04\x95" + buf[3:])  # a pickle's opening bytes
    wrong_version = bytearray(buf)
    struct.pack_into("<H", wrong_version, 4, 99)
    with pytest.raises(CodecError, match="version 99"):
        decode(bytes(wrong_version))
    with pytest.raises(CodecError, match="expected bytes"):
        decode("DSKV")


@pytest.mark.parametrize("level", ["high", "low"])
def test_a_layer_part_decodes_to_the_same_values_as_the_whole_chunk(level):
    """The store keeps KV in layer parts: a part encoded with its place in the
    model gets the model's step schedule (finer early layers), so its values are
    exactly those of the whole chunk's layers, not a schedule of its own."""
    x = kv_like(L=6, T=40, C=16)
    whole = decode(encode(x, level))
    for lo, hi in ((0, 2), (2, 4), (4, 6), (3, 6)):
        assert torch.equal(decode(encode(x[lo:hi], level, layers=(lo, 6))), whole[lo:hi])
    assert not torch.equal(decode(encode(x[4:6], level)), whole[4:6])  # as a model of its own: finer steps
    with pytest.raises(ValueError, match="part"):
        encode(x[4:6], level, layers=(5, 6))


def with_crc(buf: bytearray) -> bytes:
    """`buf` with its checksum recomputed, as a peer forging a chunk would send it."""
    import zlib
    crc_at = HEADER.size - 4
    struct.pack_into("<I", buf, crc_at, zlib.crc32(bytes(buf[HEADER.size:]), zlib.crc32(bytes(buf[:crc_at]))))
    return bytes(buf)


def test_header_fields_are_checked_even_with_a_matching_checksum():
    """A peer could send a well-formed checksum over nonsense: shape and level are
    still validated, and a lying shape cannot make decode read out of bounds."""
    buf = encode(kv_like(), "high")
    fields = list(HEADER.unpack_from(buf))
    # tokens, channels, level, coder, first layer past the model's layers, a model smaller than the chunk
    for index, value in ((9, 10_000), (9, 3), (10, 1), (2, 9), (4, 7), (6, 100), (7, 1)):
        forged = list(fields)
        forged[index] = value
        with pytest.raises(CodecError):
            decode(with_crc(bytearray(HEADER.pack(*forged)) + buf[HEADER.size:]))


def test_rans_stream_is_verified_beyond_the_checksum():
    """The rANS decoder checks its own stream: it must end exactly where its final
    state says, so damage that a forged checksum hides is still caught."""
    buf = bytearray(encode(kv_like(), "high", coder=CODER_RANS))
    buf[-40] ^= 0x5A  # inside the last (delta) stream
    with pytest.raises(CodecError, match="entropy-coded data is invalid"):
        decode(with_crc(buf))


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("level", ["lossless", "high"])
def test_forged_payloads_decode_or_fail_cleanly(level, coder):
    """Random damage under a recomputed checksum: decode returns the declared shape
    or raises CodecError, never anything else (and never reads out of bounds)."""
    x = kv_like(L=3, T=30, C=16)
    buf = encode(x, level, coder=coder)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        forged = bytearray(buf)
        for pos in torch.randint(HEADER.size, len(buf), (int(torch.randint(1, 4, (1,), generator=g)),),
                                 generator=g).tolist():
            forged[pos] = int(torch.randint(0, 256, (1,), generator=g))
        try:
            y = decode(with_crc(forged))
        except CodecError:
            continue
        assert y.shape == x.shape


def test_a_rans_chunk_without_the_extension_is_a_clear_error(monkeypatch):
    buf = encode(kv_like(), "high", coder=CODER_RANS)
    monkeypatch.setattr(codec, "native_available", lambda: False)
    with pytest.raises(CodecError, match="native rANS coder"):
        decode(buf)
    assert decode(encode(kv_like(), "high")).shape == kv_like().shape  # encodes with the range coder then


def test_restored_kv_reproduces_the_model(tiny_engine):
    """A context's KV taken out of the pool, coded losslessly, decoded and loaded
    back gives exactly the logits of the original; a lossy level stays close."""
    from droidspeak.scheduler.sequence import Sequence
    runner = tiny_engine.runner
    ids = list(range(5, 70))
    ctx, suffix = ids[:50], ids[50:]
    seq = Sequence(runner)
    seq.extend(ctx)
    ref = seq.extend(suffix)
    x = seq.kv_tensors(len(ctx))
    seq.release()
    for level in ("lossless", "high"):
        y = decode(encode(x, level))
        restored = Sequence(runner)
        restored.load(y)
        logits = restored.extend(suffix)
        restored.release()
        if level == "lossless":
            assert torch.equal(logits, ref)
        else:  # a random tiny model is touchy; still close, and mostly the same greedy tokens
            assert (logits - ref).abs().mean() < 0.1 * ref.abs().mean()
            assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    assert runner.allocator.num_referenced == runner.allocator.refs.sum() and tiny_engine.scheduler.is_idle


@pytest.mark.parametrize("native", [True, False])
def test_codec_dtype_conversions_round_as_torch_does(native, monkeypatch):
    """The codec converts dtypes without torch's parallel ops (none on the store's
    threads): bf16 widening is exact and narrowing rounds to nearest even, as
    torch does, by the native single-threaded op and by numpy without it."""
    import numpy as np

    from droidspeak.cachegen import codec
    from droidspeak.cachegen.codec import _as_float32, _from_float32
    if not native:
        monkeypatch.setattr(codec, "native_available", lambda: False)
    x = torch.randn(3, 500, 64, generator=torch.Generator().manual_seed(3)) * 10
    x[0, 0, :3] = torch.tensor([1.00390625, 1.01171875, -2.0078125])  # exact ties between bf16 neighbours
    b = x.to(torch.bfloat16)
    assert np.array_equal(_as_float32(b), b.float().numpy())
    assert torch.equal(_from_float32(x.numpy(), torch.bfloat16), b)
    assert torch.equal(_from_float32(x.numpy(), torch.float16), x.to(torch.float16))
    assert torch.equal(_from_float32(x.numpy(), torch.float32), x)


@pytest.mark.parametrize("group", [1, 4, 10])
def test_native_dequantize_equals_numpy_bit_for_bit(group, monkeypatch):
    """The lossy levels' reconstruction runs natively where the extension is built;
    its numpy reference gives the same bits (both round each stage as numpy does),
    so a chunk decodes to the same values on machines with and without it."""
    import numpy as np

    from droidspeak import kernels
    rng = np.random.default_rng(group)
    L, C, T = 5, 24, 37
    nA = (T + group - 1) // group
    a = rng.integers(-3000, 3000, (L * C, nA))
    d = rng.integers(-60, 60, (L * C, T - nA))
    mean = rng.standard_normal((L, C)).astype(np.float32)
    a_step, d_step = [(rng.random((L, C)) * 0.3 + 1e-4).astype(np.float32) for _ in range(2)]
    ref = codec._dequantize(a, d, mean, a_step, d_step, group, T)
    # the native op reads the rows in any order, through an index per (layer, channel)
    a_perm, d_perm = rng.permutation(L * C), rng.permutation(L * C)
    a_index, d_index = np.argsort(a_perm), np.argsort(d_perm)  # row r is row index[r] of the permuted
    nat = kernels.cachegen_dequantize(*map(torch.from_numpy, (a[a_perm], d[d_perm], a_index, d_index, mean,
                                                              a_step, d_step)), group, T).numpy()
    assert np.array_equal(ref.view(np.uint32), nat.view(np.uint32))
    # and through the codec: one chunk decoded with and without the native op
    x = kv_like(L=4, T=T, C=16, dtype=torch.bfloat16)
    buf = encode(x, "medium", group=group, coder=CODER_RANGE)
    native = decode(buf)
    monkeypatch.setattr(codec, "native_available", lambda: False)
    assert torch.equal(decode(buf).view(torch.int16), native.view(torch.int16))
    identity = torch.arange(L * C)
    with pytest.raises(RuntimeError, match="do not match the shape"):
        kernels.cachegen_dequantize(torch.from_numpy(a[:, :-1].copy()), torch.from_numpy(d), identity, identity,
                                    *map(torch.from_numpy, (mean, a_step, d_step)), group, T)
    with pytest.raises(RuntimeError, match="row index outside"):
        kernels.cachegen_dequantize(torch.from_numpy(a), torch.from_numpy(d), identity, identity + 1,
                                    *map(torch.from_numpy, (mean, a_step, d_step)), group, T)
