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
def default_model_path():
    from droidspeak.models.default_model import prepare_default_model
    return prepare_default_model()


def assert_no_leak(engine):
    """Every slot is either free or held by the prefix cache, and no request row is taken."""
    sched = engine.scheduler
    assert sched.is_idle
    assert sched.cache.protected_size == 0
    assert engine.runner.allocator.available_size + sched.cache.evictable_size == engine.runner.max_total_tokens
    assert engine.runner.req_to_token_pool.available_size == engine.runner.req_to_token_pool.max_requests
