"""Which models form one family (lineage): the same architecture shape, the same
tokenizer, and a common base, either declared in config.json or detected from the
weights (fine-tunes of one base keep embedding matrices that are nearly parallel;
independently trained or initialised models do not)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from droidspeak.errors import UnsupportedModelError
from droidspeak.models.config import ModelConfig

# Shape fields that must agree for one KV pool and one cache to serve every member.
SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_kv_heads", "head_dim")
# Cosine similarity of flattened embedding matrices above which two models are taken
# to share a base. Fine-tunes measure > 0.99; unrelated models are near 0.
EMBEDDING_SIMILARITY_THRESHOLD = 0.9
# config.json key with which a checkpoint may declare its base model's name.
DECLARED_BASE_KEY = "droidspeak_base_model"


@dataclass(frozen=True)
class LineageInfo:
    lineage: str           # the family's id: the root model's name
    parent: str | None     # the model this one derives from (None for the root)
    evidence: str          # "root", "declared" or "embedding cosine 0.998"


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def embedding_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    # fp64 sums: an fp32 dot over the default model's 28M-entry embedding read a
    # model's similarity with itself as 1.003 on an AVX2 CPU
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm() + 1e-12))


def check_family(root_name: str, root_config: ModelConfig, root_tokenizer, root_embed: torch.Tensor,
                 name: str, config: ModelConfig, tokenizer, embed: torch.Tensor,
                 declared_base: str | None) -> LineageInfo:
    """LineageInfo of `name` joining the family rooted at `root_name`, or an
    UnsupportedModelError that says why it cannot."""
    for f in SHAPE_FIELDS:
        if getattr(config, f) != getattr(root_config, f):
            raise UnsupportedModelError(
                f"model {name!r} cannot join the family of {root_name!r}: {f} is "
                f"{getattr(config, f)} vs {getattr(root_config, f)}")
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(root_tokenizer):
        raise UnsupportedModelError(
            f"model {name!r} cannot join the family of {root_name!r}: its tokenizer vocabulary differs")
    if declared_base is not None:
        if declared_base != root_name:
            raise UnsupportedModelError(
                f"model {name!r} declares base {declared_base!r}, not {root_name!r}")
        return LineageInfo(root_name, root_name, "declared")
    sim = embedding_similarity(embed, root_embed)
    if sim < EMBEDDING_SIMILARITY_THRESHOLD:
        raise UnsupportedModelError(
            f"model {name!r} cannot join the family of {root_name!r}: no declared base "
            f"({DECLARED_BASE_KEY} in config.json) and its embeddings are unrelated "
            f"(cosine {sim:.3f} < {EMBEDDING_SIMILARITY_THRESHOLD})")
    return LineageInfo(root_name, root_name, f"embedding cosine {sim:.3f}")
