"""Codec profiles: calibration gives an invertible importance-whitening transform,
the codec round-trips through it within each level's bound, a chunk decodes only
with the profile that coded it, bad profile files are refused, and on the default
model the profile makes chunks smaller at no worse quality."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataclasses

from droidspeak.cachegen import codec
from droidspeak.cachegen.codec import (CodecError, chunk_token_scales, decode, encode, error_bound, profile_tag,
                                       token_scales)
from droidspeak.cachegen.transform import SINK_BINS, CodecProfile, CodecProfileError


def context_kv(engine, ids):
    """[L, T, 2 * H * D] KV of `ids` as the pool holds it, and the sequence's runner."""
    from droidspeak.scheduler.sequence import Sequence
    seq = Sequence(engine.runner)
    seq.extend(ids)
    x = seq.kv_tensors()
    seq.release()
    return x


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


SINK_TOKEN = 7


def sink_profile(profile, engine, layer=0):
    """`profile` with a hand-set sink detector: layer `layer` votes, the sink is
    that layer's V of token SINK_TOKEN (layer 0's V has no position in it, so
    every occurrence of the token matches it exactly), and a score of 0.9 or
    more refines the step 4x."""
    C = profile.channels // 2
    sink = np.zeros((profile.num_layers, C), np.float32)
    sink[layer] = context_kv(engine, [3, SINK_TOKEN])[layer, 1, C:].float().numpy()
    weight = np.zeros(profile.num_layers, np.float32)
    weight[layer] = 1
    scales = np.ones(SINK_BINS, np.float32)
    scales[-1] = 4  # scores in [0.9, 1]
    return dataclasses.replace(profile, sink=sink, sink_weight=weight, sink_scales=scales)


def test_the_sink_detector_codes_tokens_like_the_sink_with_finer_steps(tiny_codec_profile, tiny_engine):
    profile = sink_profile(tiny_codec_profile[1], tiny_engine)
    ids = [5, 6, SINK_TOKEN, 9, 10, 11, SINK_TOKEN, 12, 13, 14, 15, 16, SINK_TOKEN, 17] * 3
    x = context_kv(tiny_engine, ids)
    codes = token_scales(x, profile)
    is_sink = np.array(ids) == SINK_TOKEN
    assert (codes[is_sink] == 8).all() and (codes[~is_sink] == 0).all()
    buf = encode(x, "low", profile=profile)
    assert np.array_equal(chunk_token_scales(buf), codes)
    y = decode(buf, profile)
    err = (y - x).abs().float().amax(dim=2)  # [layers, tokens], relative to each layer's bound
    bound = error_bound(buf, profile).amax(dim=1, keepdim=True)
    assert (err[:, is_sink] <= bound / 4 * (1 + 1e-3) + 1e-6).all() and (err <= bound * (1 + 1e-3) + 1e-6).all()
    plain = encode(x, "low", profile=profile, token_scales=np.zeros(len(ids), np.uint8))
    assert len(plain) < len(buf)
    assert float((decode(plain, profile) - x)[:, is_sink].abs().mean()) > float((y - x)[:, is_sink].abs().mean())
    # a layer part coded with the whole chunk's codes decodes to exactly the whole chunk's values
    part = encode(x[1:].contiguous(), "low", layers=(1, x.shape[0]), profile=profile, token_scales=codes)
    assert torch.equal(decode(part, profile), y[1:])
    # a part without the sink layer cannot find them itself: without codes it codes every step alike
    assert not chunk_token_scales(encode(x[1:].contiguous(), "low", layers=(1, x.shape[0]), profile=profile)).any()
    with pytest.raises(ValueError, match="sink detector reads layers"):
        token_scales(x[1:], profile, first=1)
    with pytest.raises(ValueError, match="token_scales"):
        encode(x, "low", profile=profile, token_scales=np.full(len(ids), 17, np.uint8))
    # a forged step code is refused
    from test_cachegen_codec import with_crc
    forged = bytearray(buf)
    forged[codec.HEADER.size] = 17
    with pytest.raises(CodecError, match="bad token step code"):
        decode(with_crc(forged), profile)


def test_fit_sink_detector_finds_the_layers_and_the_scores_that_say_a_token_matters():
    from droidspeak.cachegen.calibrate import fit_sink_detector
    g = np.random.default_rng(0)
    n = 6000
    sinks = g.random(n) < 0.01
    importance = g.lognormal(0, 0.5, n) * np.where(sinks, 100, 1)
    cos = g.uniform(-0.3, 0.3, (3, n))
    cos[1, sinks] = g.uniform(0.7, 0.9, sinks.sum())      # layer 1 tells the sinks apart
    weight, scales = fit_sink_detector(cos, importance)
    assert weight[1] > 0.1 and weight[0] == 0 and weight[2] == 0
    from droidspeak.cachegen.transform import sink_bin
    assert (scales[sink_bin(np.array([0.85]))] == 4).all()  # sqrt(100) = 10, capped
    # an ordinary token keeps the level's step (code 0), and the scales never fall with the score
    assert scales[sink_bin(np.array([0.0]))][0] < 2 ** (1 / 8) and (np.diff(scales) >= 0).all()
    assert (scales[:sink_bin(np.array([-0.3]))[0]] == 1).all()
    # nothing correlates: no layer votes and no step is refined
    weight, scales = fit_sink_detector(g.uniform(-1, 1, (3, n)), g.lognormal(0, 0.5, n))
    assert not weight.any() and (scales == 1).all()


def test_a_sink_detector_survives_its_file_and_a_bad_one_is_refused(tiny_codec_profile, tiny_engine, tmp_path):
    from safetensors.numpy import save_file
    profile = sink_profile(tiny_codec_profile[1], tiny_engine)
    path = str(tmp_path / "sink.safetensors")
    profile.save(path)
    loaded = CodecProfile.load(path)
    assert loaded.tag == profile.tag and np.array_equal(loaded.sink, profile.sink)
    assert np.array_equal(loaded.sink_layers, [0]) and np.array_equal(loaded.sink_scales, profile.sink_scales)
    # a profile of the first format (no detector) still reads, and refines nothing
    old = str(tmp_path / "format1.safetensors")
    save_file({"centre": profile.centre, "forward": profile.forward, "inverse": profile.inverse}, old,
              metadata={"format": "1", "model": "tiny"})
    v1 = CodecProfile.load(old)
    assert v1.sink is None and v1.tag == profile.tag and not v1.sink_layers.size
    bad = str(tmp_path / "bad.safetensors")
    arrays = {"centre": profile.centre, "forward": profile.forward, "inverse": profile.inverse,
              "sink": profile.sink, "sink_weight": profile.sink_weight, "sink_scales": profile.sink_scales / 2}
    save_file(arrays, bad, metadata={"format": "2", "model": "tiny"})
    with pytest.raises(CodecProfileError, match="sink detector values"):
        CodecProfile.load(bad)
    save_file({**arrays, "sink_scales": profile.sink_scales[:3]}, bad, metadata={"format": "2", "model": "tiny"})
    with pytest.raises(CodecProfileError, match="sink detector shapes"):
        CodecProfile.load(bad)


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
    profile's sink detector finds the model's sinks: coding them with finer
    steps lowers the KL for a few percent more bytes. The benchmark measures the
    trade-off on many more contexts."""
    from droidspeak import Engine
    from droidspeak.cachegen.calibrate import calibrate
    from droidspeak.crossmodel.calibration import build_items
    from droidspeak.scheduler.sequence import Sequence

    cal = build_items("calibration", 1, context_chars=1500)
    profile = calibrate(default_model_path, [(i.context, i.question) for i in cal], samples=2, progress=False)
    assert profile.sink_layers.size and profile.sink_scales.max() > 1
    engine = Engine(None, max_total_tokens=4096, disable_cross_model=True)
    try:
        tok, runner = engine.tokenizer, engine.runner
        modes = ("plain", "profiled", "no sinks")
        sizes, kls = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0.0)
        for item in build_items("evaluation", 1, context_chars=1500)[:2]:
            ids = tok.encode(item.context + item.question, add_special_tokens=False)
            ctx, cont = ids[:256], ids[256:320]
            ref_seq = Sequence(runner)
            ref_seq.extend(ctx)
            ref = F.log_softmax(ref_seq.extend(cont), -1)
            x = ref_seq.kv_tensors(len(ctx))
            ref_seq.release()
            T = x.shape[1]
            for mode, buf in (("plain", encode(x, "low", exact_tokens=1)),
                              ("profiled", encode(x, "medium", profile=profile, exact_tokens=1)),
                              ("no sinks", encode(x, "medium", profile=profile, exact_tokens=1,
                                                  token_scales=np.zeros(T, np.uint8)))):
                y = decode(buf, profile)
                seq = Sequence(runner)
                seq.load(y)
                lp = F.log_softmax(seq.extend(cont), -1)
                seq.release()
                sizes[mode] += len(buf)
                kls[mode] += float(F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).mean())
        assert sizes["plain"] > 1.4 * sizes["profiled"]
        assert kls["profiled"] < 2 * kls["plain"]
        assert kls["profiled"] < 0.9 * kls["no sinks"] and sizes["profiled"] < 1.1 * sizes["no sinks"]
    finally:
        engine.shutdown()
