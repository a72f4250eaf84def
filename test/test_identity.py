"""Model identity: the fingerprint covers every byte of a model's files, so two
fine-tunes that differ only in their last layer never share a store key, a codec
profile or a cross-model profile."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import build_tiny_model

from droidspeak import Engine
from droidspeak.crossmodel.policy import CrossModelPolicy
from droidspeak.models.identity import _cache_path, fingerprint

OLD_FINGERPRINT_BYTES = 1 << 20  # what the fingerprint used to read of each weight file


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two models with identical embeddings and early layers (several MiB of weights)
    that differ only in the last layer, as a fine-tune with frozen embeddings does."""
    root = tmp_path_factory.mktemp("twins")
    a = build_tiny_model(str(root / "a"), num_layers=3, dims={"hidden_size": 256, "intermediate_size": 640})
    b = str(root / "b")
    shutil.copytree(a, b)
    weights = load_file(os.path.join(a, "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    tuned = {k: (v + 0.05 * v.std() * torch.randn(v.shape, generator=g)) if k.startswith("model.layers.2.") else v
             for k, v in weights.items()}
    save_file(tuned, os.path.join(b, "model.safetensors"), metadata={"format": "pt"})
    return a, b


def test_models_that_differ_past_the_first_mib_get_different_fingerprints(twins):
    a, b = twins
    heads = []
    for path in twins:
        with open(os.path.join(path, "model.safetensors"), "rb") as f:
            heads.append(f.read(OLD_FINGERPRINT_BYTES))
    assert os.path.getsize(os.path.join(a, "model.safetensors")) > 4 * OLD_FINGERPRINT_BYTES
    assert heads[0] == heads[1]  # what the old fingerprint read is the same for both
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(a)


def test_the_fingerprint_is_kept_and_redone_when_a_file_changes(tmp_path):
    path = build_tiny_model(str(tmp_path / "m"), num_layers=1)
    first = fingerprint(path)
    assert os.path.isfile(_cache_path(path))
    config = os.path.join(path, "config.json")
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:
        f.write(text.replace("}", ', "note": "edited"}', 1) if text.rstrip().endswith("}") else text + " ")
    assert fingerprint(path) != first


def test_store_keys_of_the_twins_never_mix(twins, tmp_path):
    """Each twin served under the same name over one shared disk tier: the second
    finds nothing of the first's chunks; the first's own twin engine finds them."""
    a, b = twins
    disk = str(tmp_path / "kv")
    prompt = list(range(5, 69))
    params = {"max_new_tokens": 2, "temperature": 0}

    def cached_tokens(path) -> int:
        """Serve `path` as "ft" over the shared tier: the prompt's tokens it loaded."""
        engine = Engine(path, dtype="float32", max_total_tokens=512, served_model_name="ft",
                        kv_store=f"disk:{disk}", kv_store_write="through", kv_store_chunk_size=16,
                        kv_store_levels="lossless", kv_store_load="always", chunked_prefill_size=-1)
        try:
            out = engine.generate(input_ids=prompt, sampling_params=params)
            engine.offloader.flush()
            return out["meta_info"]["kv_store_cached_tokens"]
        finally:
            engine.shutdown()
    assert cached_tokens(a) == 0   # writes its chunks
    assert cached_tokens(b) == 0   # finds none of them
    assert cached_tokens(a) == 48  # its own come back: three whole chunks of the 64-token prompt


def test_a_profile_made_for_one_twin_is_stale_for_the_other(twins, tmp_path):
    from droidspeak.crossmodel.profile import GroupScore, Profile, profile_path
    a, b = twins
    sender = build_tiny_model(str(tmp_path / "sender"), num_layers=3, dims={"hidden_size": 256,
                                                                            "intermediate_size": 640}, seed=3)
    full = GroupScore(0, 3, soft_ce=1.0, ce=1.0, kl=0.0, agreement=1.0)
    groups = [GroupScore(0, 0, soft_ce=1.5, ce=1.2, kl=0.1, agreement=0.8), full,
              GroupScore(1, 2, soft_ce=1.005, ce=1.0, kl=0.005, agreement=0.99)]
    Profile("s", "ft", 3, 1, full, groups, fingerprint(sender), fingerprint(a)).save(
        profile_path(str(tmp_path), "s", "ft"))
    for receiver, expected in ((a, 1), (b, 0)):
        policy = CrossModelPolicy.from_directory(str(tmp_path), {"s": fingerprint(sender), "ft": fingerprint(receiver)},
                                                 0.01, 3)
        assert len(policy.choices) == expected
