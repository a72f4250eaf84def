"""A rate-limited link in front of a tier, for tests and benchmarks: reads take
at least latency + bytes / bandwidth, as over a network of that speed. The
bandwidth can change while it runs (a bandwidth trace)."""
from __future__ import annotations

import threading
import time

from droidspeak.kvstore.tiers import Tier


class ThrottledTier(Tier):
    def __init__(self, inner: Tier, bandwidth_bytes_per_s: float, latency_s: float = 0.0):
        if bandwidth_bytes_per_s <= 0:
            raise ValueError("bandwidth must be positive")
        self.inner = inner
        self.name = inner.name
        self.bandwidth = float(bandwidth_bytes_per_s)
        self.latency_s = latency_s
        self._lock = threading.Lock()  # one transfer at a time, as on one link

    def set_bandwidth(self, bytes_per_s: float) -> None:
        if bytes_per_s <= 0:
            raise ValueError("bandwidth must be positive")
        self.bandwidth = float(bytes_per_s)

    def _transfer(self, fn, nbytes_of):
        with self._lock:
            t0 = time.perf_counter()
            out = fn()
            wait = self.latency_s + nbytes_of(out) / self.bandwidth - (time.perf_counter() - t0)
            if wait > 0:
                time.sleep(wait)
            return out

    def get(self, key: str) -> bytes | None:
        return self._transfer(lambda: self.inner.get(key), lambda d: len(d) if d else 0)

    def put(self, key: str, data: bytes) -> None:
        self._transfer(lambda: self.inner.put(key, data), lambda _: len(data))

    def size(self, key: str) -> int | None:
        return self._transfer(lambda: self.inner.size(key), lambda _: 0)

    def sizes(self, keys: list[str]) -> list[int | None]:
        return self._transfer(lambda: self.inner.sizes(keys), lambda _: 0)  # one round trip

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def stats(self) -> dict:
        return {**self.inner.stats(), "throttled_bytes_per_s": self.bandwidth}

    def close(self) -> None:
        self.inner.close()
