"""Store keys: a chunk of KV is named by what determines it, never by where it
came from. The model's weights (a fingerprint), the KV dtype, the chunk size and a
hash chain over the prompt's token chunks (chunk k's hash covers tokens
[0, (k + 1) * chunk_size), so a key names a whole prefix), then the part (a layer
range of KV or one layer's E cache) and the compression level."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

KEY_VERSION = "ds1"


@dataclass(frozen=True)
class Namespace:
    lineage: str   # the family's root fingerprint
    model: str     # this model's (or adapter's) fingerprint
    dtype: str     # KV dtype, e.g. "bfloat16"
    chunk_size: int

    def key(self, chunk_hash: str, part: str, level: str) -> str:
        return (f"{KEY_VERSION}:{self.lineage}:{self.model}:{self.dtype}:c{self.chunk_size}:"
                f"{chunk_hash}:{part}:{level}")


def kv_part(layer_start: int, layer_end: int) -> str:
    return f"kv{layer_start}-{layer_end}"


def e_part(layer: int) -> str:
    return f"e{layer}"


def chunk_hashes(tokens: list[int], chunk_size: int, count: int | None = None) -> list[str]:
    """Hash chain over the first `count` whole chunks of `tokens` (all of them by
    default): entry k names the prefix tokens[:(k + 1) * chunk_size]."""
    n = len(tokens) // chunk_size if count is None else min(count, len(tokens) // chunk_size)
    ids = np.asarray(tokens[:n * chunk_size], dtype="<i4")
    out, h = [], b""
    for k in range(n):
        h = hashlib.blake2b(h + ids[k * chunk_size:(k + 1) * chunk_size].tobytes(), digest_size=16).digest()
        out.append(h.hex())
    return out
