"""Storage tiers for encoded KV chunks: host RAM, a local disk directory and a
shared Redis. Each keeps bytes under string keys within a size cap (least recently
used out first; Redis caps itself). A tier that cannot answer raises TierError;
the store above turns that into a miss and a log line, never a failed request.

What a tier returns is untrusted: the codec validates every chunk (magic, version,
shape, checksum) before anything is used, and the disk tier also checks that a file
holds the key it was asked for."""
from __future__ import annotations

import abc
import hashlib
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from urllib.parse import urlparse


class TierError(RuntimeError):
    """A tier failed to answer (down, unreachable, unreadable)."""


class Tier(abc.ABC):
    name: str

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def size(self, key: str) -> int | None:
        """Bytes stored under `key` (None: absent), without reading them."""

    def sizes(self, keys: list[str]) -> list[int | None]:
        """`size` of each key; a network tier answers them in one round trip."""
        return [self.size(k) for k in keys]

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class RamTier(Tier):
    """Compressed chunks in host memory, least recently used out first."""
    name = "ram"

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.used = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        with self._lock:
            old = self._data.pop(key, None)
            self.used -= len(old) if old is not None else 0
            self._data[key] = bytes(data)
            self.used += len(data)
            while self.used > self.capacity:
                _, dropped = self._data.popitem(last=False)
                self.used -= len(dropped)

    def size(self, key: str) -> int | None:
        with self._lock:
            data = self._data.get(key)
            return None if data is None else len(data)

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            self.used -= len(old) if old is not None else 0

    def stats(self) -> dict:
        return {"entries": len(self._data), "used_bytes": self.used, "capacity_bytes": self.capacity}


# A disk entry: magic, key length, key, then the chunk bytes.
_DISK_MAGIC = b"DSKE"
_DISK_HEAD = struct.Struct("<4sH")


class DiskTier(Tier):
    """One file per chunk in `directory`, within `capacity_bytes` (oldest access
    out first). Files are written to a temporary name and renamed, so a reader
    never sees half a file; entries left by earlier runs are indexed at start."""
    name = "disk"

    def __init__(self, directory: str, capacity_bytes: int):
        self.directory = directory
        self.capacity = capacity_bytes
        os.makedirs(directory, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # file name -> bytes on disk
        files = []
        for name in os.listdir(directory):
            if name.endswith(".dsk"):
                path = os.path.join(directory, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                files.append((st.st_mtime, name, st.st_size))
        for _, name, size in sorted(files):
            self._index[name] = size
        self.used = sum(self._index.values())
        self._shrink()

    @staticmethod
    def _file(key: str) -> str:
        return hashlib.blake2b(key.encode(), digest_size=20).hexdigest() + ".dsk"

    def get(self, key: str) -> bytes | None:
        name = self._file(key)
        with self._lock:
            if name not in self._index:
                return None
            self._index.move_to_end(name)
        try:
            with open(os.path.join(self.directory, name), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            self._forget(name)
            return None
        except OSError as e:
            raise TierError(f"disk tier {self.directory}: {e}") from None
        kb = key.encode()
        head = _DISK_HEAD.size
        if len(raw) < head or raw[:4] != _DISK_MAGIC:
            raise TierError(f"disk tier {self.directory}: {name} is not a droidspeak entry")
        (_, n) = _DISK_HEAD.unpack_from(raw)
        if raw[head:head + n] != kb:
            raise TierError(f"disk tier {self.directory}: {name} holds another key")
        return raw[head + n:]

    def put(self, key: str, data: bytes) -> None:
        kb = key.encode()
        blob = _DISK_HEAD.pack(_DISK_MAGIC, len(kb)) + kb + data
        if len(blob) > self.capacity:
            return
        name = self._file(key)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, os.path.join(self.directory, name))
        except OSError as e:
            raise TierError(f"disk tier {self.directory}: {e}") from None
        with self._lock:
            self.used += len(blob) - self._index.pop(name, 0)
            self._index[name] = len(blob)
        self._shrink()

    def size(self, key: str) -> int | None:
        with self._lock:
            n = self._index.get(self._file(key))
        return None if n is None else n - _DISK_HEAD.size - len(key.encode())

    def delete(self, key: str) -> None:
        name = self._file(key)
        self._forget(name)
        try:
            os.unlink(os.path.join(self.directory, name))
        except OSError:
            pass

    def _forget(self, name: str) -> None:
        with self._lock:
            self.used -= self._index.pop(name, 0)

    def _shrink(self) -> None:
        while True:
            with self._lock:
                if self.used <= self.capacity or not self._index:
                    return
                name, size = self._index.popitem(last=False)
                self.used -= size
            try:
                os.unlink(os.path.join(self.directory, name))
            except OSError:
                pass

    def stats(self) -> dict:
        return {"entries": len(self._index), "used_bytes": self.used, "capacity_bytes": self.capacity,
                "directory": self.directory}


class RedisTier(Tier):
    """A Redis server shared by several engines (`redis://host:port/db`). Timeouts
    are short: a slow or dead Redis must cost a request little before the store
    gives up on it and recomputes."""
    name = "redis"

    def __init__(self, url: str, timeout_s: float = 1.0, ttl_s: int | None = None):
        import redis  # optional at import time of the package, required for this tier

        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"a Redis tier needs a redis:// URL, got {url!r}")
        self.url = url
        self.ttl_s = ttl_s
        self._errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._errors as e:
            raise TierError(f"redis tier {self.url}: {e}") from None

    def get(self, key: str) -> bytes | None:
        return self._call(self._client.get, key)

    def put(self, key: str, data: bytes) -> None:
        if self.ttl_s:
            self._call(self._client.set, key, data, self.ttl_s)
        else:
            self._call(self._client.set, key, data)

    def size(self, key: str) -> int | None:
        n = self._call(self._client.strlen, key)
        return int(n) if n else None

    def sizes(self, keys: list[str]) -> list[int | None]:
        def lookup():
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.strlen(k)
            return pipe.execute()
        return [int(n) if n else None for n in self._call(lookup)]

    def delete(self, key: str) -> None:
        self._call(self._client.delete, key)

    def stats(self) -> dict:
        return {"url": self.url}

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a dead connection
            pass


def make_tiers(spec: str, ram_bytes: int, disk_dir: str, disk_bytes: int) -> list[Tier]:
    """Tiers from a comma-separated spec: `ram`, `disk` or `disk:/path`, and
    `redis://host:port[/db]`, fastest first."""
    tiers: list[Tier] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "ram":
            tiers.append(RamTier(ram_bytes))
        elif item == "disk" or item.startswith("disk:"):
            tiers.append(DiskTier(item[5:] if item.startswith("disk:") and item[5:] else disk_dir, disk_bytes))
        elif item.startswith(("redis://", "rediss://", "unix://")):
            tiers.append(RedisTier(item))
        else:
            raise ValueError(f"unknown KV store tier {item!r}: use ram, disk[:DIR] or redis://HOST:PORT")
    order = {"ram": 0, "disk": 1, "redis": 2}
    return sorted(tiers, key=lambda t: order[t.name])
