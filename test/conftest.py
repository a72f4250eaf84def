import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import build_tiny_model  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real default model (runs in CI; seconds to a minute)")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama):
    from droidspeak import Engine
    engine = Engine(tiny_llama, dtype="float32", max_total_tokens=4096, max_running_requests=16,
                    chunked_prefill_size=-1)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def tiny_codec_profile(tiny_llama, tmp_path_factory):
    """(path, profile): the tiny model's codec profile, calibrated on a few texts."""
    from helpers import CORPUS
    from droidspeak.cachegen.calibrate import calibrate
    texts = [(CORPUS[i] * 3, CORPUS[i + 1]) for i in range(4)]
    profile = calibrate(tiny_llama, texts, "tiny", samples=2, progress=False)
    path = str(tmp_path_factory.mktemp("codec_profile") / "tiny.safetensors")
    profile.save(path)
    return path, profile


@pytest.fixture(scope="session")
def default_model_path():
    from droidspeak.models.default_model import prepare_default_model
    return prepare_default_model()


def cache_references(cache, attr):
    """Slot references held by the prefix cache's entries (`slots` or `erows`), per space."""
    counts, stack = None, [cache.root] if hasattr(cache, "root") else []
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        for entry in node.entries.values():
            t = getattr(entry, attr)
            if t is not None:
                c = (t > 0).sum(dim=1)
                counts = c if counts is None else counts + c
    return counts


def assert_no_leak(engine):
    """Every slot reference (KV and E cache) is held by a prefix-cache entry, each
    slot with references is out of the free lists, and no request row is taken."""
    sched, runner = engine.scheduler, engine.runner
    assert sched.is_idle
    assert not sched.leases.live, f"{len(sched.leases)} KV lease(s) still open"
    assert sched.cache.protected_size == 0
    for alloc, attr in ((runner.allocator, "slots"), (runner.e_allocator, "erows")):
        if alloc is None:
            continue
        held = cache_references(sched.cache, attr)
        expected = [0] * alloc.num_spaces if held is None else held.tolist()
        assert alloc.refs.sum(dim=1).tolist() == expected
        in_use = (alloc.refs[:, 1:] > 0).sum(dim=1).tolist()
        assert [alloc.size - c for c in alloc._count] == in_use
    if runner.allocator.num_spaces == 1:
        assert runner.allocator.available_size + sched.cache.evictable_size == runner.max_total_tokens
    else:
        assert runner.allocator.available_size + sched.cache.evictable_size <= runner.max_total_tokens
    assert runner.req_to_token_pool.available_size == runner.req_to_token_pool.max_requests
