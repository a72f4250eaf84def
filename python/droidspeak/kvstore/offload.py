"""Between the KV pool and the tiered store: chunks the radix tree lets go of (or,
writing through, every finished request's chunks) are copied out of the pool at
once and encoded and stored by a background writer; a request whose prefix the
tree misses gets the chunks the store holds, fetched at the level the streamer
picks, decoded, validated and written into fresh pool slots.

A chunk is `chunk_size` tokens at a multiple of `chunk_size` from the prompt's
start, stored per model as one KV part (all layers) at each configured level, and,
for models whose E cache is kept, one lossless part per E-cache layer."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass

import torch

from droidspeak.cachegen.codec import CodecError, decode, encode
from droidspeak.kvcache.pool import HiddenPool, KVPool
from droidspeak.kvstore.keys import Namespace, chunk_hashes, e_part, kv_part
from droidspeak.kvstore.store import TieredStore
from droidspeak.kvstore.streamer import LEVEL_ORDER, CostModel, choose_level

logger = logging.getLogger(__name__)

LOAD_WINDOW = 2           # chunks fetched and decoded at once while loading
WRITE_QUEUE = 64          # chunks waiting for the writer; more are dropped (counted)
KNOWN_CHUNKS = 1 << 16    # (model, chunk) pairs remembered as stored, to skip re-encoding


@dataclass
class Loaded:
    """KV (and E cache) for tokens [start, end) of a prompt, read from the store."""
    start: int
    end: int
    kv: torch.Tensor            # [layers, end - start, 2 * kv_heads * head_dim]
    e: torch.Tensor | None      # [E layers, end - start, hidden] or None
    levels: list[str]


@dataclass
class _WriteJob:
    ns: Namespace
    chunk_hash: str
    kv: torch.Tensor
    e: dict[int, torch.Tensor]


class KVOffloader:
    def __init__(self, store: TieredStore, kv_pool: KVPool, e_pool: HiddenPool | None,
                 namespace_of: Callable[[int], Namespace | None], chunk_size: int = 256,
                 levels: tuple[str, ...] = ("high", "low"), ttft_target_s: float | None = None,
                 cost: CostModel | None = None, adaptive: bool = True):
        bad = [lv for lv in levels if lv not in LEVEL_ORDER]
        if bad or not levels:
            raise ValueError(f"KV store levels must be among {LEVEL_ORDER}, got {list(levels)}")
        self.store = store
        self.kv_pool, self.e_pool = kv_pool, e_pool
        self.namespace_of = namespace_of
        self.chunk_size = chunk_size
        self.levels = tuple(lv for lv in LEVEL_ORDER if lv in levels)
        self.ttft_target_s = ttft_target_s
        self.cost = cost or CostModel()
        self.adaptive = adaptive  # False: always load what the store holds
        self.part = kv_part(0, kv_pool.num_layers)
        self.counters = {"chunks_offered": 0, "chunks_written": 0, "chunks_dropped": 0, "chunks_loaded": 0,
                         "tokens_loaded": 0, "chunks_recompute_chosen": 0, "chunks_corrupt": 0}
        self.level_counts = {lv: 0 for lv in self.levels}
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._known_lock = threading.Lock()
        self._queue: queue.Queue[_WriteJob | None] = queue.Queue(WRITE_QUEUE)
        self._pool = ThreadPoolExecutor(LOAD_WINDOW, thread_name_prefix="kv-store-load")
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="kv-store-prefetch")
        self._writer = threading.Thread(target=self._write_loop, name="kv-store-writer", daemon=True)
        self._writer.start()

    # ---- shapes --------------------------------------------------------------
    @property
    def channels(self) -> int:
        k = self.kv_pool.k
        return 2 * k.shape[2] * k.shape[3]

    def _gather(self, slots: torch.Tensor) -> torch.Tensor:
        """[layers, n, 2*H*D] KV of `slots` ([G, n], one row per segment)."""
        pool, bounds = self.kv_pool, self.kv_pool.segments.bounds
        n = slots.shape[1]
        parts = []
        for g in range(len(bounds) - 1):
            lo, hi = bounds[g], bounds[g + 1]
            k = pool.k[lo:hi].index_select(1, slots[g]).reshape(hi - lo, n, -1)
            v = pool.v[lo:hi].index_select(1, slots[g]).reshape(hi - lo, n, -1)
            parts.append(torch.cat([k, v], dim=2))
        return torch.cat(parts, dim=0)

    def _scatter(self, kv: torch.Tensor, slots: torch.Tensor) -> None:
        pool, bounds = self.kv_pool, self.kv_pool.segments.bounds
        half = kv.shape[2] // 2
        shape = pool.k.shape[2:]
        for g in range(len(bounds) - 1):
            for layer in range(bounds[g], bounds[g + 1]):
                pool.k[layer].index_copy_(0, slots[g], kv[layer, :, :half].reshape(-1, *shape))
                pool.v[layer].index_copy_(0, slots[g], kv[layer, :, half:].reshape(-1, *shape))

    def _remember(self, ns: Namespace, chunk_hash: str) -> None:
        with self._known_lock:
            self._known[(ns.model, chunk_hash)] = None
            self._known.move_to_end((ns.model, chunk_hash))
            while len(self._known) > KNOWN_CHUNKS:
                self._known.popitem(last=False)

    def _is_known(self, ns: Namespace, chunk_hash: str) -> bool:
        with self._known_lock:
            return (ns.model, chunk_hash) in self._known

    # ---- write path ------------------------------------------------------------
    def offer(self, tokens: list[int], start: int, variant: int, slots: torch.Tensor,
              erows: torch.Tensor | None) -> None:
        """Store the chunks of `variant`'s KV of `tokens` that end after `start`.
        `slots` [G, len(tokens)] and `erows` [E, len(tokens)] (0: not kept) are the
        pool locations; they are read now, before the caller frees them."""
        ns = self.namespace_of(variant)
        C = self.chunk_size
        if ns is None or len(tokens) < C:
            return
        hashes = chunk_hashes(tokens, C)
        for k in range(start // C, len(hashes)):
            if self._is_known(ns, hashes[k]):
                continue
            span = slice(k * C, (k + 1) * C)
            if bool((slots[:, span] <= 0).any()):
                continue
            e = {}
            if erows is not None and self.e_pool is not None:
                for j, layer in enumerate(self.e_pool.layers):
                    rows = erows[j, span]
                    if bool((rows > 0).all()):
                        e[layer] = self.e_pool.h[j].index_select(0, rows).unsqueeze(0)
            self.counters["chunks_offered"] += 1
            try:
                self._queue.put_nowait(_WriteJob(ns, hashes[k], self._gather(slots[:, span]), e))
                self._remember(ns, hashes[k])
            except queue.Full:
                self.counters["chunks_dropped"] += 1

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._write(job)
            except Exception:  # a failed write loses a cached chunk, never the engine
                logger.exception("KV store: writing a chunk failed")
            finally:
                self._queue.task_done()

    def _write(self, job: _WriteJob) -> None:
        keys = {lv: job.ns.key(job.chunk_hash, self.part, lv) for lv in self.levels}
        if self.store.locate(list(keys.values())) is None:
            for lv, key in keys.items():
                self.store.put(key, encode(job.kv, lv))
        for layer, e in job.e.items():
            key = job.ns.key(job.chunk_hash, e_part(layer), "lossless")
            if not self.store.has(key):
                self.store.put(key, encode(e, "lossless"))
        self.counters["chunks_written"] += 1

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every offered chunk is stored (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.flush(10.0)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True)
        self.store.close()

    # ---- read path ---------------------------------------------------------------
    def prefetch(self, key: list[int], limit: int, candidates: list[tuple[int, int, tuple[int, ...]]]) -> Future:
        """Start loading in the background, so the scheduler never waits on a tier:
        `candidates` are (variant, cached prefix length, E layers) in order of
        preference (the request's own model, then cross-model senders). The
        future's result is (variant, Loaded) for the first that the store holds,
        or None."""
        return self._prefetcher.submit(self._prefetch, key, limit, candidates)

    def _prefetch(self, key, limit, candidates):
        try:
            for variant, start, e_layers in candidates:
                loaded = self.load(variant, key, start, limit, e_layers)
                if loaded is not None:
                    return variant, loaded
        except Exception:  # a failed prefetch costs a recompute, never the request
            logger.exception("KV store: prefetch failed")
        return None

    def load(self, variant: int, tokens: list[int], start: int, limit: int,
             e_layers: tuple[int, ...] = ()) -> Loaded | None:
        """KV of `variant` for tokens [start, end) from the store, end <= limit on a
        chunk boundary, chunk by chunk while the store holds them and loading beats
        recomputing. `e_layers`: the E-cache layers to bring too (all of them or the
        load carries none)."""
        ns = self.namespace_of(variant)
        C = self.chunk_size
        if ns is None or (start // C + 1) * C > limit:
            return None
        hashes = chunk_hashes(tokens, C, limit // C)
        budget = None if self.ttft_target_s is None else self.ttft_target_s * C / max(limit - start, 1)
        shape = (self.kv_pool.num_layers, C, self.channels)
        # Chunks are planned one at a time, with what the last transfers measured,
        # and fetched + decoded two at a time (the decoder releases the GIL).
        pending: list[tuple[Future, str, list | None]] = []
        kvs, es, levels = [], [], []
        with_e = bool(e_layers)
        stop = False
        for k in range(start // C, len(hashes)):
            if len(pending) >= LOAD_WINDOW:
                stop = not self._collect(pending.pop(0), kvs, es, levels)
                if stop:
                    break
            keys = {lv: ns.key(hashes[k], self.part, lv) for lv in self.levels}
            found = self.store.locate(list(keys.values()))
            if found is None:
                break
            state, sizes = found
            by_level = {lv: sizes[key] for lv, key in keys.items() if key in sizes}
            level = choose_level(by_level, self.store.bandwidth(state), 0.0, self.cost, budget,
                                  self.cost.prefill_s(k * C, limit - k * C), len(hashes) - k, self.adaptive,
                                  loading=bool(kvs or pending))
            if level is None:
                self.counters["chunks_recompute_chosen"] += 1
                break
            kv = self._pool.submit(self._fetch, state, keys[level], level, shape)
            e = [self._pool.submit(self._fetch_e, ns, hashes[k], layer) for layer in e_layers] if with_e else None
            pending.append((kv, level, e))
        for job in pending:  # in order; everything after a failed chunk is dropped
            if stop or not self._collect(job, kvs, es, levels):
                stop = True
                job[0].cancel()
        if es and len(es) != len(kvs):
            es = []
        if not kvs:
            return None
        for k in range(start // C, start // C + len(kvs)):
            self._remember(ns, hashes[k])
        first = start - (start // C) * C
        end = (start // C + len(kvs)) * C
        kv = torch.cat(kvs, dim=1)[:, first:]
        e = torch.cat(es, dim=1)[:, first:] if es else None
        for lv in levels:
            self.level_counts[lv] += 1
        self.counters["chunks_loaded"] += len(kvs)
        self.counters["tokens_loaded"] += end - start
        return Loaded(start, end, kv, e, levels)

    @staticmethod
    def _collect(job, kvs: list, es: list, levels: list) -> bool:
        """Append one planned chunk's results; False if its KV did not arrive."""
        kv_future, level, e_futures = job
        kv = kv_future.result()
        if kv is None:
            return False
        e = [f.result() for f in e_futures] if e_futures is not None else None
        if e is not None and all(x is not None for x in e) and len(es) == len(kvs):
            es.append(torch.cat(e, dim=0))
        kvs.append(kv)
        levels.append(level)
        return True

    def _fetch(self, state, key: str, level: str, shape: tuple[int, int, int]) -> torch.Tensor | None:
        data = self.store.get(state, key)
        if data is None:
            return None
        t0 = time.perf_counter()
        try:
            x = decode(data)
            if tuple(x.shape) != shape:
                raise CodecError(f"chunk has shape {list(x.shape)}, this model's KV is {list(shape)}")
        except CodecError as e:
            self.counters["chunks_corrupt"] += 1
            logger.warning("KV store: dropping a bad chunk from the %s tier (%s); recomputing", state.name, e)
            self.store.discard(key)
            return None
        self.cost.observe_decode(level, len(data), time.perf_counter() - t0)
        return x

    def _fetch_e(self, ns: Namespace, chunk_hash: str, layer: int) -> torch.Tensor | None:
        key = ns.key(chunk_hash, e_part(layer), "lossless")
        found = self.store.locate([key])
        if found is None:
            return None
        return self._fetch(found[0], key, "lossless", (1, self.chunk_size, self.e_pool.h.shape[2]))

    def write(self, loaded: Loaded, slots: torch.Tensor, erows: torch.Tensor | None) -> None:
        """Put a load's KV into pool `slots` [G, n] and its E cache into `erows` [E, n]."""
        self._scatter(loaded.kv.to(self.kv_pool.dtype), slots)
        if erows is not None and loaded.e is not None:
            for j in range(erows.shape[0]):
                self.e_pool.h[j].index_copy_(0, erows[j], loaded.e[j].to(self.e_pool.h.dtype))

    def stats(self) -> dict:
        return {"chunk_size": self.chunk_size, "levels": list(self.levels), "adaptive": self.adaptive,
                "ttft_target_ms": None if self.ttft_target_s is None else 1e3 * self.ttft_target_s,
                "prefill_ms_per_chunk_at_4k": 1e3 * self.cost.prefill_s(4096, self.chunk_size),
                **self.counters, "chunks_by_level": dict(self.level_counts), "tiers": self.store.stats()}
