"""Model identity: a fingerprint over every byte of a model's (or adapter's) weights,
config and tokenizer files. It names the model's chunks in the KV store, its codec
profile and its cross-model profiles, so two models that differ anywhere never
share an entry.

Hashing a large model takes seconds, so the result is kept in the cache directory
(model directories are often read-only) under the directory's path, with the name,
size, mtime and inode of every file it covered: any change to a file re-hashes."""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os

from droidspeak.models.default_model import cache_dir

logger = logging.getLogger(__name__)

IDENTITY_VERSION = 2
# What a model directory's identity covers: weights, configs and tokenizer files.
IDENTITY_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt")
HASH_CHUNK_BYTES = 1 << 22
LOG_HASH_ABOVE_BYTES = 1 << 30  # say so when hashing more than this (it takes seconds)


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    names = {n for pattern in IDENTITY_PATTERNS for n in glob.glob(os.path.join(path, pattern))}
    return sorted(n for n in names if os.path.isfile(n))


def _file_identity(name: str) -> list:
    st = os.stat(name)
    return [os.path.basename(name), st.st_size, st.st_mtime_ns, st.st_ino]


def _cache_path(path: str) -> str:
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
    return os.path.join(cache_dir(), "fingerprints", f"{key}.json")


def fingerprint(path: str) -> str:
    """16 hex digits identifying the model or adapter at `path` (a directory or a
    single weight file) by the content of every file it is made of."""
    files = _files(path)
    identity = [IDENTITY_VERSION] + [_file_identity(n) for n in files]
    cached = _cache_path(path)
    try:
        with open(cached) as f:
            entry = json.load(f)
        if entry.get("identity") == identity and isinstance(entry.get("fingerprint"), str):
            return entry["fingerprint"]
    except (OSError, ValueError):
        pass
    total = sum(item[1] for item in identity[1:])
    if total > LOG_HASH_ABOVE_BYTES:
        logger.info("hashing %s (%.1f GiB) for its identity; kept for later starts", path, total / 2**30)
    h = hashlib.sha256()
    for name in files:
        h.update(os.path.basename(name).encode() + b"\0")
        h.update(str(os.path.getsize(name)).encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                h.update(chunk)
    value = h.hexdigest()[:16]
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"path": os.path.realpath(path), "identity": identity, "fingerprint": value}, f)
        os.replace(tmp, cached)
    except OSError as exc:  # a read-only cache only costs the next start a re-hash
        logger.warning("could not keep the fingerprint of %s: %s", path, exc)
    return value
