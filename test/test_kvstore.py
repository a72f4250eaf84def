"""The tiered KV store: keys, tiers (RAM, disk, a real redis-server), the throttled
link, level choice, and the engine storing evicted KV and loading it back, shared
between engines, with a corrupt entry or a dead Redis degrading to recompute."""
import logging
import os
import shutil
import socket
import subprocess
import time

import pytest
import torch

from conftest import assert_no_leak
from helpers import record_fetches
from droidspeak import Engine
from droidspeak.kvstore.keys import Namespace, chunk_hashes
from droidspeak.kvstore.link import ThrottledTier
from droidspeak.kvstore.store import TieredStore
from droidspeak.kvstore.streamer import CostModel, choose_level
from droidspeak.kvstore.tiers import DiskTier, RamTier, RedisTier, TierError, make_tiers

CHUNK = 16


# ---- keys, tiers, link, level choice ---------------------------------------------------
def test_hash_chain_names_whole_prefixes():
    a = list(range(100))
    b = a[:40] + [999] + a[41:]
    ha, hb = chunk_hashes(a, CHUNK), chunk_hashes(b, CHUNK)
    assert len(ha) == 100 // CHUNK
    assert ha[:2] == hb[:2]                      # chunks before the change agree
    assert all(x != y for x, y in zip(ha[2:], hb[2:]))  # every chunk from the change on differs
    assert chunk_hashes(a, CHUNK, 3) == ha[:3]
    ns = Namespace("root", "model", "bfloat16", CHUNK)
    assert ns.key(ha[0], "kv0-3", "high") != ns.key(ha[0], "kv0-3", "low")


def test_ram_tier_keeps_the_most_recent_within_its_cap():
    t = RamTier(capacity_bytes=250)
    for i in range(3):
        t.put(f"k{i}", bytes(100))
    assert t.get("k0") is None and t.size("k1") == 100 and t.get("k2") == bytes(100)
    t.get("k1")            # k1 is now the most recent: k2 goes first
    t.put("k3", bytes(100))
    assert t.get("k2") is None and t.get("k1") is not None and t.used <= 250


def test_disk_tier_persists_caps_and_checks_what_it_reads(tmp_path):
    t = DiskTier(str(tmp_path), capacity_bytes=10_000)
    t.put("a", b"x" * 3000)
    t.put("b", b"y" * 3000)
    again = DiskTier(str(tmp_path), capacity_bytes=10_000)   # a restart indexes what is there
    assert again.get("a") == b"x" * 3000 and again.size("b") == 3000
    for i in range(4):
        again.put(f"c{i}", b"z" * 3000)
    assert again.used <= 10_000 and again.get("a") is None   # oldest out first
    assert len(os.listdir(tmp_path)) == len(again._index)
    # A file that holds another key (or foreign bytes) is an error, not data.
    path = os.path.join(tmp_path, DiskTier._file("c3"))
    shutil.copy(os.path.join(tmp_path, DiskTier._file("c2")), path)
    with pytest.raises(TierError, match="another key"):
        again.get("c3")


def test_throttled_link_takes_at_least_size_over_bandwidth():
    t = ThrottledTier(RamTier(1 << 20), bandwidth_bytes_per_s=1e6, latency_s=0.01)
    t.put("k", bytes(50_000))
    start = time.perf_counter()
    assert t.get("k") == bytes(50_000)
    assert time.perf_counter() - start >= 0.01 + 50_000 / 1e6
    # A chunk's layer parts are looked up in one round trip, not one per key.
    start = time.perf_counter()
    assert t.sizes(["k", "absent"] * 10) == [50_000, None] * 10
    assert time.perf_counter() - start < 5 * 0.01


def test_bandwidth_is_measured_as_link_throughput_over_concurrent_reads():
    """Loads run two fetches at once, each seeing half the link: the estimate is
    what the link moves per second, not what one read saw."""
    from concurrent.futures import ThreadPoolExecutor
    store = TieredStore([ThrottledTier(RamTier(1 << 24), bandwidth_bytes_per_s=2e6)])
    for i in range(6):
        store.put(f"k{i}", bytes(100_000))
    state = store.states[0]
    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(lambda i: store.get(state, f"k{i}") is not None, range(6)))
    assert store.bandwidth(state) == pytest.approx(2e6, rel=0.25)


def test_level_choice_follows_bandwidth_and_falls_back_to_recompute():
    cost = CostModel()
    cost.decode_s_per_byte = {"lossless": 1e-8, "high": 1e-8, "low": 1e-8}
    sizes = {"lossless": 4_000_000, "high": 2_000_000, "low": 1_000_000}

    def level(bandwidth, budget=None, recompute=0.256, chunks=1):
        return choose_level(sizes, bandwidth, 0, cost, budget, recompute, chunks)
    # Recomputing the chunk costs 0.256 s here.
    assert level(1e10) == "lossless"                  # fast link: best quality
    assert level(1e7) == "high"                       # 0.22 s, lossless 0.44 s
    assert level(5e6) == "low"                        # high 0.42 s, low 0.21 s
    assert level(1e6) is None                         # a second even for low: recompute
    assert level(3e7) == "lossless"                   # 0.17 s
    # A TTFT share tighter than recompute picks a smaller level.
    assert level(3e7, budget=0.1) == "high" and level(3e7, budget=0.05) == "low"
    # Stopping means prefilling everything after: the rest's cost decides, not this chunk's.
    assert level(1e6, recompute=20.0, chunks=10) == "low"
    # Hysteresis near break-even: low takes 0.21 s; recomputing 0.23 s is too close
    # to start loading, but a load under way goes on until it is clearly slower.
    assert level(5e6, recompute=0.23) is None
    assert choose_level(sizes, 5e6, 0, cost, None, 0.23, loading=True) == "low"
    assert choose_level(sizes, 5e6, 0, cost, None, 0.19, loading=True) == "low"
    assert choose_level(sizes, 5e6, 0, cost, None, 0.17, loading=True) is None
    # In a stream, one chunk's decode overlaps the next one's transfer (two fetches in
    # flight): 0.12 s on the link + 0.06 s decoding costs about 0.12 s per chunk, which
    # beats recomputing at 0.2 s per chunk; a single such chunk (0.18 s) does not,
    # clearly enough.
    streaming = CostModel()
    streaming.decode_s_per_byte = {"low": 6e-8}
    assert choose_level({"low": 1_000_000}, 1e6 / 0.12, 0, streaming, None, 0.2 * 16, 16) == "low"
    assert choose_level({"low": 1_000_000}, 1e6 / 0.12, 0, streaming, None, 0.2, 1) is None
    # Always loading: the best level within the budget, else the fastest.
    assert choose_level(sizes, 1e6, 0, cost, None, 0.256, allow_recompute=False) == "lossless"
    assert choose_level(sizes, 1e6, 0, cost, 0.5, 0.256, allow_recompute=False) == "low"


def test_prefill_cost_model_learns_that_deep_chunks_cost_more():
    cost = CostModel()
    a, b = 2e-4, 5e-7     # seconds per token, and per token per position attended over
    c = 0.03              # and per forward pass
    for n, start in [(512, 0), (256, 1024), (64, 4000), (1024, 512), (32, 8000), (300, 2000)] * 4:
        attended = n * (start + n / 2)
        cost.observe_prefill(n, attended, c + a * n + b * attended)
    assert cost.measured_prefill
    for start in (0, 4096):
        truth = c + a * 256 + b * 256 * (start + 128)
        assert abs(cost.prefill_s(start, 256) - truth) < 0.05 * truth
    assert cost.prefill_s(4096, 256) > 3 * cost.prefill_s(0, 256)
    # One long prefill, then many short ones over it (what a cache-hit workload sees):
    # the fit still reproduces the long one instead of extrapolating from the short.
    skewed = CostModel()
    skewed.observe_prefill(4128, 4128 * 2064, 5.6)
    for _ in range(5000):
        skewed.observe_prefill(32, 32 * 4112, 0.2)
    assert skewed.prefill_s(0, 4128) == pytest.approx(5.6, rel=0.05)
    assert skewed.prefill_s(4096, 32) == pytest.approx(0.2, rel=0.05)


def test_prefill_cost_model_follows_a_drifting_machine():
    """Minutes of prefills at one speed, then the machine slows by half: the next
    few short prefills scale the estimate of a long one (whose shape was measured
    only at the old speed), and it comes back when the machine does."""
    a, b, c = 2e-4, 5e-7, 0.03

    def seconds(n, start, slowdown=1.0):
        return slowdown * (c + a * n + b * n * (start + n / 2))
    cost = CostModel()
    for n, start in [(512, 0), (256, 1024), (64, 4000), (1024, 512), (32, 8000), (4096, 0)] * 4:
        cost.observe_prefill(n, n * (start + n / 2), seconds(n, start))
    assert cost.speed == pytest.approx(1.0, rel=0.01)
    assert cost.prefill_s(0, 4096) == pytest.approx(seconds(4096, 0), rel=0.05)
    for _ in range(4):
        cost.observe_prefill(32, 32 * 8016, seconds(32, 8000, 1.5))
    # Most of the slowdown reaches the long prefill (the rest went into the fit,
    # which the slow short prefills are part of); without the scale it stays at 1.0x.
    assert cost.prefill_s(0, 4096) == pytest.approx(seconds(4096, 0, 1.5), rel=0.2)
    assert cost.prefill_s(0, 4096) > 1.25 * seconds(4096, 0)
    for _ in range(CostModel.RECENT):
        cost.observe_prefill(32, 32 * 8016, seconds(32, 8000))
    assert cost.prefill_s(0, 4096) == pytest.approx(seconds(4096, 0), rel=0.15)
    # One wild measurement (a page-fault storm, a stolen core) moves it only within limits.
    cost.observe_prefill(32, 32 * 8016, 100.0)
    assert cost.speed <= CostModel.SPEED_LIMITS[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port (installed by the set-up)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("redis-server did not start")
    yield url, proc
    proc.kill()
    proc.wait()


def test_a_failing_tier_is_skipped_logged_and_retried(redis_server, caplog):
    url, proc = redis_server
    ram = RamTier(1 << 20)
    store = TieredStore([ram, RedisTier(url, timeout_s=0.5)], retry_s=0.2)
    store.put("k", b"v" * 100)
    assert store.states[1].tier.get("k") == b"v" * 100   # written through to Redis
    ram.delete("k")
    state, sizes = store.locate(["k"])
    assert state.name == "redis" and sizes == {"k": 100}
    assert store.get(state, "k") == b"v" * 100 and ram.get("k") == b"v" * 100  # promoted into RAM
    proc.kill()
    proc.wait()
    ram.delete("k")
    with caplog.at_level(logging.WARNING):
        assert store.locate(["k"]) is None
        assert store.locate(["k"]) is None
    warnings = [r for r in caplog.records if "redis tier failed" in r.getMessage()]
    assert len(warnings) == 1                     # one line per outage, not per request
    assert store.stats()[1]["up"] is False and store.stats()[1]["errors"] == 1
    time.sleep(0.25)
    assert store.locate(["k"]) is None and store.stats()[1]["errors"] == 2  # retried after retry_s


def test_tier_spec_parsing(tmp_path):
    tiers = make_tiers(f"disk:{tmp_path},ram", 1 << 20, "/unused", 1 << 20)
    assert [t.name for t in tiers] == ["ram", "disk"] and tiers[1].directory == str(tmp_path)
    with pytest.raises(ValueError, match="unknown KV store tier"):
        make_tiers("s3://bucket", 1, "/x", 1)


# ---- the engine ------------------------------------------------------------------------
def prompt(seed: int, n: int = 100) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 390, (n,), generator=g).tolist()


GREEDY = {"max_new_tokens": 6, "temperature": 0}


def store_engine(path, **kw):
    """The tiny model prefills about as fast as the codec decodes, so whether the
    adaptive policy loads depends on the machine: these engines always load."""
    kw.setdefault("kv_store_levels", "lossless")
    kw.setdefault("kv_store_load", "always")
    return Engine(path, dtype="float32", max_total_tokens=256, chunked_prefill_size=-1,
                  kv_store_chunk_size=CHUNK, **kw)


def tokens(meta):
    return [t for _, t in meta["output_token_logprobs"]]


def logprobs(meta):
    return torch.tensor([lp for lp, _ in meta["output_token_logprobs"]])


def run(engine, ids):
    out = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
    return out["meta_info"]


def test_bad_store_settings_are_clear_errors(tiny_llama):
    from droidspeak.errors import InvalidRequestError
    for kw, field in (({"kv_store": "s3://bucket"}, "unknown KV store tier"),
                      ({"kv_store": "ram", "kv_store_levels": "best"}, "levels must be among"),
                      ({"kv_store": "ram", "kv_store_write": "sometimes"}, "kv_store_write"),
                      ({"kv_store": "ram", "disable_radix_cache": True}, "radix cache")):
        with pytest.raises(InvalidRequestError, match=field):
            Engine(tiny_llama, dtype="float32", max_total_tokens=256, **kw)


def test_evicted_kv_comes_back_from_the_ram_tier(tiny_llama):
    e = store_engine(tiny_llama, kv_store="ram")
    try:
        first = run(e, prompt(0))
        for seed in (1, 2, 3):                   # push the first prompt out of the pool
            run(e, prompt(seed, 120))
        e.offloader.flush()
        assert e.offloader.counters["chunks_written"] >= 100 // CHUNK
        again = run(e, prompt(0))
        # Six whole chunks of the 100-token prompt come from the store; the rest runs.
        assert again["kv_store_cached_tokens"] == 96 and again["cached_tokens"] == 96
        assert tokens(again) == tokens(first)
        assert torch.allclose(logprobs(again),
                              logprobs(first), atol=1e-4)
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_adaptive_loading_recomputes_over_a_slow_link(tiny_llama):
    # At 1 KB/s a chunk takes seconds to arrive; prefilling its 16 tokens takes far less.
    e = store_engine(tiny_llama, kv_store="ram", kv_store_load="adaptive", kv_store_bandwidth_mbps=0.001)
    try:
        first = run(e, prompt(0))
        for seed in (1, 2, 3):
            run(e, prompt(seed, 120))
        e.offloader.flush()
        assert e.offloader.cost.measured_prefill
        again = run(e, prompt(0))
        assert again["kv_store_cached_tokens"] == 0 and e.offloader.counters["chunks_recompute_chosen"] == 1
        assert tokens(again) == tokens(first)
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_lossy_levels_load_within_the_codec_bound(tiny_llama):
    e = store_engine(tiny_llama, kv_store="ram", kv_store_levels="high")
    try:
        ids = prompt(4)
        run(e, ids)
        pool = e.runner.kv_pool
        match = e.scheduler.cache.match_prefix(ids, 0)
        reference_k = pool.k[:, match.indices[0, :96]].clone()
        for seed in (5, 6, 7):
            run(e, prompt(seed, 120))
        e.offloader.flush()
        again = run(e, ids)
        assert again["kv_store_cached_tokens"] == 96 and e.offloader.level_counts["high"] == 6
        restored = pool.k[:, e.scheduler.cache.match_prefix(ids, 0).indices[0, :96]]
        err = (restored - reference_k).abs()
        assert 0 < float(err.max()) < 0.05 * float(reference_k.abs().max())
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_the_store_codes_with_the_codec_profile_and_keeps_the_sink_exact(tiny_llama, tiny_codec_profile):
    from droidspeak.cachegen.codec import profile_tag
    path, profile = tiny_codec_profile
    e = store_engine(tiny_llama, kv_store="ram", kv_store_levels="medium", kv_store_codec_profile=path)
    try:
        assert e.offloader.codec_profile.tag == profile.tag
        ids = prompt(4)
        run(e, ids)
        pool = e.runner.kv_pool
        reference_k = pool.k[:, e.scheduler.cache.match_prefix(ids, 0).indices[0, :96]].clone()
        for seed in (5, 6, 7):
            run(e, prompt(seed, 120))
        e.offloader.flush()
        ram = e.offloader.store.tiers[0]
        keys = [k for k in ram._data if k.endswith(f":medium@{profile.tag:016x}")]
        assert keys and all(profile_tag(ram._data[k]) == profile.tag for k in keys)
        again = run(e, ids)
        assert again["kv_store_cached_tokens"] == 96 and e.offloader.level_counts["medium"] == 6
        restored = pool.k[:, e.scheduler.cache.match_prefix(ids, 0).indices[0, :96]]
        assert torch.equal(restored[:, 0], reference_k[:, 0])  # the prompt's first token, as computed
        err = (restored - reference_k).abs().amax(dim=1).flatten(1)  # [layers, K channels]
        from droidspeak.cachegen.codec import LEVELS
        bound = torch.from_numpy(profile.error_bound(LEVELS[2].coefficient_step, 0, profile.num_layers))
        assert float(err.max()) > 0 and (err <= bound[:, :err.shape[1]] * (1 + 1e-4) + 1e-6).all()
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_every_layer_part_of_a_chunk_refines_the_steps_of_the_chunks_sinks(tiny_llama, tiny_codec_profile,
                                                                         tiny_engine, tmp_path):
    """The sink detector reads layer 0 only; with one layer per part, the parts of
    later layers still code each chunk's sink tokens with finer steps."""
    import numpy as np

    from test_codec_profile import SINK_TOKEN, sink_profile
    from droidspeak.cachegen.codec import chunk_token_scales
    profile = sink_profile(tiny_codec_profile[1], tiny_engine)
    path = str(tmp_path / "sink.safetensors")
    profile.save(path)
    e = store_engine(tiny_llama, kv_store="ram", kv_store_levels="low", kv_store_codec_profile=path,
                     kv_store_part_layers=1, kv_store_write="through")
    try:
        ids = prompt(4)
        ids[3::9] = [SINK_TOKEN] * len(ids[3::9])
        run(e, ids)
        e.offloader.flush()
        data = e.offloader.store.tiers[0]._data
        hashes = chunk_hashes(ids, CHUNK)
        for i, h in enumerate(hashes):
            parts = [data[k] for k in data if f":{h}:kv" in k and k.endswith(f":low@{profile.tag:016x}")]
            assert len(parts) == profile.num_layers
            expected = (np.array(ids[i * CHUNK:(i + 1) * CHUNK]) == SINK_TOKEN) * 8
            for buf in parts:
                assert np.array_equal(chunk_token_scales(buf), expected)
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_engines_share_kv_through_a_disk_tier_and_survive_corrupt_entries(tiny_llama, tmp_path, caplog):
    spec = f"disk:{tmp_path}"
    a = store_engine(tiny_llama, kv_store=spec, kv_store_write="through")
    try:
        expected = run(a, prompt(8))
        a.offloader.flush()
    finally:
        a.shutdown()
    assert len(os.listdir(tmp_path)) == 6          # written through: no eviction needed
    b = store_engine(tiny_llama, kv_store=spec)
    try:
        got = run(b, prompt(8))
        assert got["kv_store_cached_tokens"] == 96
        assert tokens(got) == tokens(expected)
    finally:
        b.shutdown()
    for name in os.listdir(tmp_path):              # flip one byte in the middle of every entry
        path = os.path.join(tmp_path, name)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
    c = store_engine(tiny_llama, kv_store=spec)
    try:
        with caplog.at_level(logging.WARNING):
            got = run(c, prompt(8))
        assert got["kv_store_cached_tokens"] == 0 and got["cached_tokens"] == 0
        assert tokens(got) == tokens(expected)
        assert c.offloader.counters["chunks_corrupt"] >= 1   # two chunks are in flight at once
        assert any("bad chunk" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
        assert_no_leak(c)
    finally:
        c.shutdown()


def test_engines_share_kv_through_redis_and_keep_answering_when_it_dies(tiny_llama, redis_server, caplog):
    url, proc = redis_server
    a = store_engine(tiny_llama, kv_store=url)     # auto: write-through with a shared tier
    b = store_engine(tiny_llama, kv_store=f"ram,{url}")
    try:
        expected = [run(a, prompt(seed)) for seed in (10, 11)]
        a.offloader.flush()
        got = run(b, prompt(10))
        assert got["kv_store_cached_tokens"] == 96
        assert tokens(got) == \
            tokens(expected[0])
        proc.kill()
        proc.wait()
        with caplog.at_level(logging.WARNING):
            got = run(b, prompt(11))                # Redis is gone: recompute, same answer
            more = run(b, prompt(12))
        assert got["kv_store_cached_tokens"] == 0
        assert tokens(got) == \
            tokens(expected[1])
        assert more["completion_tokens"] == GREEDY["max_new_tokens"]
        assert any("redis tier failed" in r.getMessage() for r in caplog.records)
        redis_stats = [t for t in b.offloader.store.stats() if t["tier"] == "redis"][0]
        assert redis_stats["errors"] >= 1
        assert_no_leak(b)
    finally:
        a.shutdown()
        b.shutdown()


def test_a_request_can_wait_until_its_chunks_are_in_the_shared_tier(tiny_llama, redis_server):
    """Write-through runs in the background; with wait_for_kv_store the answer
    comes once the request's chunks are in Redis, so another engine's request sent
    right after it finds the whole prefix."""
    url, _ = redis_server
    a = store_engine(tiny_llama, kv_store=url)  # auto: write-through with a shared tier
    b = store_engine(tiny_llama, kv_store=url)
    try:
        throttle(a, 0.2)  # each lookup and write of a's tier takes 0.2 s
        waited = prompt(70)
        a.generate(input_ids=waited, sampling_params=GREEDY, wait_for_kv_store=True)
        assert run(b, waited)["kv_store_cached_tokens"] == 96
        unwaited = prompt(71)
        a.generate(input_ids=unwaited, sampling_params=GREEDY)
        assert run(b, unwaited)["kv_store_cached_tokens"] < 96  # its chunks are still on the way
        assert_no_leak(a)
        assert_no_leak(b)
    finally:
        a.shutdown()
        b.shutdown()


def test_server_flags_metrics_and_info(tiny_llama, tmp_path):
    """The KV store over HTTP: flags parsed, a flushed prefix comes back from the disk
    tier, /server_info and /metrics report it."""
    import signal

    import httpx
    from test_server import start_server

    proc, url = start_server(tiny_llama, "--kv-store", f"disk:{tmp_path}", "--kv-store-write", "through",
                             "--kv-store-chunk-size", str(CHUNK), "--kv-store-levels", "lossless",
                             "--kv-store-load", "always", "--chunked-prefill-size", "-1")
    try:
        # The writer stores in the background; this request's answer waits for it.
        body = {"input_ids": prompt(20), "sampling_params": GREEDY, "wait_for_kv_store": True}
        first = httpx.post(url + "/generate", json=body, timeout=60).json()
        stats = httpx.get(url + "/server_info").json()["kv_store_stats"]
        assert stats["chunks_written"] == 6
        assert stats["tiers"][0]["tier"] == "disk" and stats["levels"] == ["lossless"]
        assert httpx.post(url + "/flush_cache").status_code == 200
        again = httpx.post(url + "/generate", json=body, timeout=60).json()
        assert again["meta_info"]["kv_store_cached_tokens"] == 96 and again["text"] == first["text"]
        metrics = httpx.get(url + "/metrics").text
        assert "droidspeak_kv_store_tokens_loaded_total 96.0" in metrics
        assert 'droidspeak_kv_store_chunks_loaded_total{level="lossless"} 6.0' in metrics
        assert 'droidspeak_kv_store_tier_up{tier="disk"} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_slow_store_load_does_not_hold_up_running_requests(tiny_llama):
    """KV-store loads run in the background: while one request's chunks crawl over
    a slow link, the engine keeps decoding the others, and the slow one is admitted
    with its loaded prefix when its chunks are in."""
    e = store_engine(tiny_llama, kv_store="ram", kv_store_write="through")
    try:
        b_ids = prompt(30)
        expected = run(e, b_ids)
        e.offloader.flush()
        e.flush_cache()
        state = e.offloader.store.states[0]
        state.tier = ThrottledTier(state.tier, bandwidth_bytes_per_s=1e9, latency_s=0.1)  # per lookup and read
        sched = e.scheduler
        (a,), _ = e.make_requests(input_ids=prompt(31), sampling_params={"max_new_tokens": 30, "temperature": 0,
                                                                           "ignore_eos": True})
        (b,), _ = e.make_requests(input_ids=b_ids, sampling_params=GREEDY)
        sched.add_request(a)
        while not a.output_ids:
            sched.step()
        sched.add_request(b)
        progressed = 0
        while not b.store_prefetch.done():
            before = len(a.output_ids)
            sched.step()
            progressed += len(a.output_ids) - before
            assert b in sched.waiting  # not admitted until its load is in
        assert progressed >= 5
        while sched.has_work:
            sched.step()
        assert b.store_tokens == 96 and b.cached_tokens == 96
        assert b.output_ids == tokens(expected)
        assert_no_leak(e)
    finally:
        e.shutdown()


def throttle(engine, latency_s):
    """Each lookup and read of the engine's first tier takes `latency_s` from now on."""
    state = engine.offloader.store.states[0]
    state.tier = ThrottledTier(state.tier, bandwidth_bytes_per_s=1e9, latency_s=latency_s)


def record_layer_starts(model) -> list[tuple[int, float]]:
    starts = []
    for i, layer in enumerate(model.layers):
        def spy(*args, _i=i, _forward=layer.forward, **kw):
            starts.append((_i, time.perf_counter()))
            return _forward(*args, **kw)
        layer.forward = spy
    return starts


def reload_through_slow_link(path, seed: int, latency_s: float, **kw):
    """Answer a prompt, drop the tree, and answer it again from the store (one KV
    part per layer) behind a link where each lookup and read takes `latency_s`.
    Returns both answers, the fetches and the layers' start times of the second."""
    e = store_engine(path, kv_store="ram", kv_store_write="through", kv_store_part_layers=1, **kw)
    try:
        ids = prompt(seed)
        expected = run(e, ids)
        e.offloader.flush()
        e.flush_cache()
        throttle(e, latency_s)
        arrivals = record_fetches(e.offloader)
        layers = record_layer_starts(e.runner.model)
        got = run(e, ids)
        assert_no_leak(e)
        return expected, got, arrivals, layers, len(e.runner.model.layers)
    finally:
        e.shutdown()


def test_stored_prefix_streams_in_layer_by_layer_under_the_prefill(tiny_llama):
    """With nothing else running, a request is admitted as soon as its load is
    planned: its prefill runs layer 0 while later layers' parts are still on the
    way, and the answer is the one computed without the store."""
    expected, got, arrivals, layers, num_layers = reload_through_slow_link(tiny_llama, 40, 0.03)
    assert got["kv_store_cached_tokens"] == 96 and tokens(got) == tokens(expected)
    assert len(arrivals) == num_layers * 96 // CHUNK   # one fetch per (layer part, chunk)
    # Parts are queued in layer order, and the prefill's first layer ran before the last arrived.
    order = [int(key.split(":kv")[1].split("-")[0]) for key, _ in arrivals]
    assert order == sorted(order)
    assert min(t for i, t in layers if i == 0) < max(t for _, t in arrivals)


def test_without_the_pipeline_a_request_waits_for_its_whole_prefix(tiny_llama):
    expected, got, arrivals, layers, _ = reload_through_slow_link(tiny_llama, 41, 0.02,
                                                                  disable_kv_store_pipeline=True)
    assert got["kv_store_cached_tokens"] == 96 and tokens(got) == tokens(expected)
    assert min(t for i, t in layers if i == 0) > max(t for _, t in arrivals)


def test_a_part_lost_mid_stream_sends_the_request_back_to_be_prefilled(tiny_llama, caplog):
    """The request was admitted while its parts streamed in; the last layer's part
    of one chunk turns out corrupt. The request drops what it holds, goes back to
    the queue and is prefilled from scratch: same answer, nothing leaked."""
    e = store_engine(tiny_llama, kv_store="ram", kv_store_write="through", kv_store_part_layers=1)
    try:
        ids = prompt(42)
        expected = run(e, ids)
        e.offloader.flush()
        e.flush_cache()
        ram = e.offloader.store.states[0].tier
        last = len(e.runner.model.layers) - 1
        key = next(k for k in ram._data if f":kv{last}-{last + 1}:" in k)
        data = bytearray(ram._data[key])
        data[len(data) // 2] ^= 0xFF
        ram._data[key] = bytes(data)
        with caplog.at_level(logging.WARNING):
            got = run(e, ids)
        assert tokens(got) == tokens(expected)
        assert got["kv_store_cached_tokens"] == 0 and got["cached_tokens"] == 0
        assert e.offloader.counters["chunks_corrupt"] == 1 and e.offloader.counters["chunks_loaded"] == 0
        assert any("prefilling it from scratch" in r.getMessage() for r in caplog.records)
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_a_streamed_prefix_followed_by_a_chunked_prefill(tiny_llama):
    """A stored prefix of 96 tokens, then 88 more prompt tokens prefilled in chunks of
    32: the load binds to the first chunk's forward, the later chunks read it from
    the tree, and the answer is the one computed without the store."""
    head = prompt(50)
    ids = head + prompt(51, 84)
    plain = Engine(tiny_llama, dtype="float32", max_total_tokens=512)
    try:
        expected = run(plain, ids)
    finally:
        plain.shutdown()
    e = Engine(tiny_llama, dtype="float32", max_total_tokens=512, chunked_prefill_size=32, kv_store="ram",
               kv_store_write="through", kv_store_levels="lossless", kv_store_load="always",
               kv_store_chunk_size=CHUNK, kv_store_part_layers=1)
    try:
        run(e, head)  # only the head's chunks go to the store
        e.offloader.flush()
        e.flush_cache()
        prefills, forward = [], e.runner.forward

        def spy(batch, *args, **kw):
            if batch.mode.name == "EXTEND":
                prefills.append((batch.num_tokens, len(batch.loads)))
            return forward(batch, *args, **kw)
        e.runner.forward = spy
        got = run(e, ids)
        assert got["kv_store_cached_tokens"] == 96 and tokens(got) == tokens(expected)
        assert prefills == [(32, 1), (32, 0), (24, 0)]  # 88 tokens after the load, in chunks of 32
        assert_no_leak(e)
    finally:
        e.shutdown()


def test_aborting_a_request_whose_prefix_is_streaming_in_frees_everything(tiny_llama):
    e = store_engine(tiny_llama, kv_store="ram", kv_store_write="through", kv_store_part_layers=1)
    try:
        ids = prompt(52)
        run(e, ids)
        e.offloader.flush()
        e.flush_cache()
        throttle(e, 0.02)
        sched = e.scheduler
        (req,), _ = e.make_requests(input_ids=ids, sampling_params=GREEDY)
        sched.add_request(req)
        while not req.store_prefetch.done():  # planned; its parts still on the way
            time.sleep(0.005)
        assert sched.abort_request(req.rid) != []
        assert req.store_prefetch is None and not sched.has_work
        assert_no_leak(e)
        again = run(e, ids)  # the store still serves the prefix afterwards
        assert again["kv_store_cached_tokens"] == 96
    finally:
        e.shutdown()
