"""Codec profiles: calibration gives an invertible importance-whitening transform,
the codec round-trips through it within each level's bound, a chunk decodes only
with the profile that coded it, bad profile files are refused, and on the default
model the profile makes chunks smaller at no worse quality."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from droidspeak.cachegen import codec
from droidspeak.cachegen.codec import CodecError, decode, encode, error_bound, profile_tag
from droidspeak.cachegen.transform import CodecProfile, CodecProfileError


def context_kv(engine, ids):
    """[L, T, 2 * H * D] KV of `ids` as the pool holds it, and the sequence's runner."""
    from droidspeak.runner.sequence import Sequence
    seq = Sequence(engine.runner)
    seq.extend(ids)
    k, v = seq.kv()
    seq.release()
    return torch.cat([k.flatten(2), v.flatten(2)], dim=2)


def test_calibration_gives_an_invertible_transform_that_survives_its_file(tiny_codec_profile, tiny_engine):
    path, profile = tiny_codec_profile
    loaded = CodecProfile.load(path)
    assert loaded.tag == profile.tag and loaded.model == "tiny"
    kv = tiny_engine.runner.kv_pool.k
    assert (profile.num_layers, profile.channels) == (kv.shape[0], 2 * kv.shape[2] * kv.shape[3])
    x = context_kv(tiny_engine, list(range(5, 60))).float().numpy()
    z = profile.to_coefficients(x, 0)
    np.testing.assert_allclose(profile.from_coefficients(z, 0), x, atol=1e-4 * np.abs(x).max())
    # the transform whitens: coefficients of the calibration-like text are spread
    # on a common scale (the profile normalises the weighted variance to 1)
    assert 0.01 < float(z.var()) < 100


@pytest.mark.parametrize("level", ["high", "medium", "low"])
def test_profiled_levels_round_trip_within_their_bound(tiny_codec_profile, tiny_engine, level):
    _, profile = tiny_codec_profile
    x = context_kv(tiny_engine, list(range(5, 70)))
    buf = encode(x, level, profile=profile)
    assert profile_tag(buf) == profile.tag
    y = decode(buf, profile)
    bound = error_bound(buf, profile)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ((y - x).abs().amax(dim=1) <= bound * (1 + 1e-4) + 1e-6).all() and bound.max() > 0
    # a part of the layers, with the prompt's first token kept exactly
    part = x[1:].contiguous()
    buf = encode(part, level, layers=(1, x.shape[0]), profile=profile, exact_tokens=1)
    y = decode(buf, profile)
    assert torch.equal(y[:, 0], part[:, 0])
    assert ((y - part).abs().amax(dim=1) <= error_bound(buf, profile) * (1 + 1e-4) + 1e-6).all()


def test_profiled_levels_trade_size_for_error(tiny_codec_profile, tiny_engine):
    _, profile = tiny_codec_profile
    x = context_kv(tiny_engine, list(range(5, 120)))
    bufs = {lv: encode(x, lv, profile=profile) for lv in ("high", "medium", "low")}
    assert len(bufs["low"]) < len(bufs["medium"]) < len(bufs["high"]) < len(encode(x, "lossless"))
    errs = {lv: float((decode(b, profile) - x).abs().mean()) for lv, b in bufs.items()}
    assert errs["high"] < errs["medium"] < errs["low"]


def test_a_profiled_chunk_decodes_only_with_its_profile(tiny_codec_profile, tiny_engine):
    _, profile = tiny_codec_profile
    x = context_kv(tiny_engine, list(range(5, 40)))
    buf = encode(x, "medium", profile=profile)
    with pytest.raises(CodecError, match="coded with codec profile"):
        decode(buf)
    other = CodecProfile("other", profile.centre + 1, profile.forward, profile.inverse)
    with pytest.raises(CodecError, match="not with"):
        decode(buf, other)
    with pytest.raises(ValueError, match="cannot code"):
        encode(x[:, :, :-2].contiguous(), "medium", profile=profile)
    # the lossless level never needs one
    assert profile_tag(encode(x, "lossless", profile=profile)) == 0


@pytest.mark.parametrize("first", [0, 1])
def test_native_transform_equals_numpy(tiny_codec_profile, first):
    from droidspeak.cachegen.transform import kernels
    _, profile = tiny_codec_profile
    if not kernels.native_available():
        pytest.fail("the native extension is not built")
    g = torch.Generator().manual_seed(first)
    x = torch.randn(profile.num_layers - first, 37, profile.channels, generator=g).numpy()  # a ragged token tile
    for forward in (True, False):
        np.testing.assert_allclose(profile._apply(x, first, forward),
                                   profile._apply_numpy(x, first, forward), rtol=1e-5, atol=1e-5)


def test_profiled_chunks_decode_without_the_extension(tiny_codec_profile, tiny_engine, monkeypatch):
    """The fallback path (numpy transforms, constriction) reads what it writes."""
    from droidspeak.cachegen import transform
    _, profile = tiny_codec_profile
    x = context_kv(tiny_engine, list(range(5, 50)))
    monkeypatch.setattr(transform.kernels, "native_available", lambda: False)
    monkeypatch.setattr(codec, "native_available", lambda: False)
    buf = encode(x, "medium", profile=profile)
    y = decode(buf, profile)
    assert ((y - x).abs().amax(dim=1) <= error_bound(buf, profile) * (1 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_tokens_are_stored_as_they_are_without_a_profile(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 40, 16, generator=g) * 3).to(dtype)
    for exact in (1, 40):
        y = decode(encode(x, "low", exact_tokens=exact))
        assert y.dtype == dtype and y.shape == x.shape and torch.equal(y[:, :exact], x[:, :exact])
    bad = x.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(CodecError, match="non-finite"):
        decode(encode(bad, "low", exact_tokens=1))
    assert len(encode(x, "low", exact_tokens=1)) > len(encode(x, "low"))
    with pytest.raises(ValueError, match="exact_tokens"):
        encode(x, "low", exact_tokens=41)


def test_bad_profile_files_are_refused(tiny_codec_profile, tiny_llama, tmp_path):
    from safetensors.numpy import save_file

    from droidspeak import Engine
    from droidspeak.errors import InvalidRequestError
    _, profile = tiny_codec_profile
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    broken = str(tmp_path / "broken.safetensors")
    save_file({"centre": profile.centre, "forward": profile.forward, "inverse": profile.forward},
              broken, metadata={"format": "1", "model": "tiny"})
    for path, message in ((str(junk), "not a codec profile"), (broken, "do not invert")):
        with pytest.raises(CodecProfileError, match=message):
            CodecProfile.load(path)
        with pytest.raises(InvalidRequestError, match="kv_store_codec_profile") as err:
            Engine(tiny_llama, dtype="float32", max_total_tokens=256, kv_store="ram",
                   kv_store_codec_profile=path)
        assert err.value.field == "kv_store_codec_profile"
    engine = Engine(tiny_llama, dtype="float32", max_total_tokens=256, kv_store="ram",
                    kv_store_codec_profile="none")
    try:
        assert engine.offloader.codec_profile is None
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_on_the_default_model_a_profile_makes_chunks_smaller_at_no_worse_quality(default_model_path):
    """Calibrated on three texts and measured on two held-out contexts: the
    profile's medium level is far smaller than the plain low level, and the
    model's next-token distributions over a continuation stay about as close to
    the full KV's (KL within 2x; a broken transform is 10x off or more). The
    benchmark measures the trade-off on many more contexts."""
    from droidspeak import Engine
    from droidspeak.cachegen.calibrate import calibrate
    from droidspeak.crossmodel.calibration import build_items
    from droidspeak.runner.sequence import Sequence

    cal = build_items("calibration", 1, context_chars=1500)
    profile = calibrate(default_model_path, [(i.context, i.question) for i in cal], samples=2, progress=False)
    engine = Engine(None, max_total_tokens=4096, disable_cross_model=True)
    try:
        tok, runner = engine.tokenizer, engine.runner
        sizes, kls = {"plain": 0, "profiled": 0}, {"plain": 0.0, "profiled": 0.0}
        for item in build_items("evaluation", 1, context_chars=1500)[:2]:
            ids = tok.encode(item.context + item.question, add_special_tokens=False)
            ctx, cont = ids[:256], ids[256:320]
            ref_seq = Sequence(runner)
            ref_seq.extend(ctx)
            ref = F.log_softmax(ref_seq.extend(cont), -1)
            k, v = ref_seq.kv(len(ctx))
            ref_seq.release()
            L, T, H, D = k.shape
            x = torch.cat([k.flatten(2), v.flatten(2)], dim=2)
            for mode, buf in (("plain", encode(x, "low", exact_tokens=1)),
                              ("profiled", encode(x, "medium", profile=profile, exact_tokens=1))):
                y = decode(buf, profile)
                seq = Sequence(runner)
                seq.load(y[..., :H * D].reshape(L, T, H, D), y[..., H * D:].reshape(L, T, H, D))
                lp = F.log_softmax(seq.extend(cont), -1)
                seq.release()
                sizes[mode] += len(buf)
                kls[mode] += float(F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).mean())
        assert sizes["plain"] > 1.4 * sizes["profiled"]
        assert kls["profiled"] < 2 * kls["plain"]
    finally:
        engine.shutdown()
