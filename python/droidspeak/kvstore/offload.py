"""Between the KV pool and the tiered store: chunks the radix tree lets go of (or,
writing through, every finished request's chunks) are copied out of the pool at
once and encoded and stored by a background writer; a request whose prefix the
tree misses gets the chunks the store holds, fetched at the level the streamer
picks, decoded, validated and written into fresh pool slots.

A chunk is `chunk_size` tokens at a multiple of `chunk_size` from the prompt's
start, stored per model as KV layer parts (`part_layers` layers each) at each
configured level, and, for models whose E cache is kept, one lossless part per
E-cache layer.

Loading is pipelined by layer with compute. A load is planned (which chunks, at
which level) and its fetches queued, E cache first and then the KV parts in
layer order; the scheduler admits the request with fresh slots for the loaded
span, and its prefill waits, layer by layer, only for the part that layer reads
(`PoolLoad.ensure`). A cross-model hit's recompute starts as soon as the E cache
is in, while the reused layers stream on. A part that does not arrive (a tier
failed, a corrupt entry) fails the load: the scheduler drops what the request
holds and prefills it from scratch."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from droidspeak.cachegen.codec import CodecError, decode, encode, token_scales
from droidspeak.cachegen.transform import CodecProfile
from droidspeak.kvcache.pool import HiddenPool, KVPool
from droidspeak.kvstore.keys import Namespace, chunk_hashes, e_part, kv_part
from droidspeak.kvstore.store import TieredStore, TierState
from droidspeak.kvstore.streamer import LEVEL_ORDER, CostModel, choose_level

logger = logging.getLogger(__name__)

LOAD_WINDOW = 2           # fetches (and decodes) in flight at once
WRITE_QUEUE = 64          # chunks waiting for the writer; more are dropped (counted)
KNOWN_CHUNKS = 1 << 16    # (model, chunk) pairs remembered as stored, to skip re-encoding
PART_LAYERS = 6           # layers per stored KV part: the unit that loading runs ahead of compute by


class StoreLoad:
    """A planned load of one model's (`variant`'s) KV for tokens [start, end) of a
    prompt, in flight: per KV layer part and per E-cache layer, one fetch per
    chunk (each a Future of the decoded tensor, None if it did not arrive)."""

    def __init__(self, variant: int, ns: Namespace, hashes: list[str], start: int, end: int, chunk_start: int,
                 parts: list[tuple[int, int]], kv: list[list[Future]], e: list[list[Future]] | None,
                 levels: list[str]):
        self.variant, self.ns, self.hashes = variant, ns, hashes
        self.start, self.end = start, end
        self.skip = start - chunk_start  # tokens of the first chunk before `start`
        self.parts, self.kv, self.e, self.levels = parts, kv, e, levels

    @property
    def has_e(self) -> bool:
        return self.e is not None

    def futures(self) -> list[Future]:
        return [f for fs in self.kv + (self.e or []) for f in fs]

    def done(self) -> bool:
        return all(f.done() for f in self.futures())

    def cancel(self) -> None:
        for f in self.futures():
            f.cancel()

    def _join(self, futures: list[Future]) -> torch.Tensor | None:
        """The chunks' tensors joined along tokens from `start`, or None if one is missing."""
        try:
            parts = [f.result() for f in futures]
        except Exception:  # a fetch that broke (cancelled, a bug) costs a recompute, not the engine
            logger.exception("KV store: a fetch failed")
            return None
        if any(p is None for p in parts):
            return None
        return torch.cat(parts, dim=1)[:, self.skip:]

    def part(self, index: int) -> torch.Tensor | None:
        """[layers of the part, end - start, channels] (waits for it)."""
        return self._join(self.kv[index])

    def e_cache(self) -> torch.Tensor | None:
        """[E layers, end - start, hidden] (waits for it)."""
        if self.e is None:
            return None
        layers = [self._join(fs) for fs in self.e]
        return None if any(x is None for x in layers) else torch.cat(layers, dim=0)


class PoolLoad:
    """A StoreLoad bound to pool slots at admission: tokens [start, load.end) go
    to `slots` [G, n], the E cache to `erows` [E, n] (None: not kept;
    `temporary_erows`: rows the scheduler frees after the forward, for a
    recompute that reads another model's E cache). The forward calls
    `ensure(layer)` before each layer and `ensure_e()` before a recompute reads
    the E cache; each writes its part once, when it is in."""

    def __init__(self, offloader: "KVOffloader", load: StoreLoad, skip: int, slots: torch.Tensor,
                 erows: torch.Tensor | None, temporary_erows: bool):
        self.offloader, self.load, self.skip = offloader, load, skip
        self.slots, self.erows, self.temporary_erows = slots, erows, temporary_erows
        self.written = [False] * len(load.parts)
        self.e_written = erows is None
        self.failed = False

    @property
    def tokens(self) -> int:
        return int(self.slots.shape[1])

    def ensure(self, layer: int) -> None:
        p = self.offloader.part_of[layer]
        if self.written[p]:
            return
        self.written[p] = True
        kv = None if self.failed else self.load.part(p)
        if kv is None:
            self.failed = True
            return
        lo, hi = self.load.parts[p]
        self.offloader.kv_pool.scatter(kv[:, self.skip:], lo, hi, self.slots)

    def ensure_e(self) -> None:
        if self.e_written:
            return
        self.e_written = True
        e = None if self.failed else self.load.e_cache()
        if e is None:
            self.failed = True
            return
        pool = self.offloader.e_pool
        for j in range(self.erows.shape[0]):
            pool.h[j].index_copy_(0, self.erows[j], e[j, self.skip:].to(pool.h.dtype))

    def finish(self) -> bool:
        """Write whatever the forward did not ask for; True if everything arrived."""
        self.ensure_e()
        for lo, _ in self.load.parts:
            self.ensure(lo)
        if not self.failed:
            self.offloader._loaded(self.load, self.tokens)
        return not self.failed


@dataclass
class _WriteJob:
    ns: Namespace
    chunk_hash: str
    kv: torch.Tensor
    e: dict[int, torch.Tensor]
    first: bool  # the prompt's first chunk: its first token (the attention sink) is stored exactly
    written: Future = field(default_factory=Future)  # done once every tier has been given the chunk


class KVOffloader:
    def __init__(self, store: TieredStore, kv_pool: KVPool, e_pool: HiddenPool | None,
                 namespace_of: Callable[[int], Namespace | None], chunk_size: int = 256,
                 levels: tuple[str, ...] = ("high", "low"), ttft_target_s: float | None = None,
                 cost: CostModel | None = None, adaptive: bool = True, part_layers: int = PART_LAYERS,
                 codec_profile: CodecProfile | None = None):
        bad = [lv for lv in levels if lv not in LEVEL_ORDER]
        if bad or not levels:
            raise ValueError(f"KV store levels must be among {LEVEL_ORDER}, got {list(levels)}")
        if part_layers < 1:
            raise ValueError(f"KV store layer parts need at least one layer, got {part_layers}")
        self.store = store
        self.kv_pool, self.e_pool = kv_pool, e_pool
        self.codec_profile = codec_profile
        # a lossy chunk decodes only with the profile that coded it, so its key
        # names the profile: engines with different profiles miss, not collide
        suffix = "" if codec_profile is None else f"@{codec_profile.tag:016x}"
        self._level_keys = {lv: lv if lv == "lossless" else lv + suffix for lv in LEVEL_ORDER}
        self.namespace_of = namespace_of
        self.chunk_size = chunk_size
        self.levels = tuple(lv for lv in LEVEL_ORDER if lv in levels)
        self.ttft_target_s = ttft_target_s
        self.cost = cost or CostModel()
        self.adaptive = adaptive  # False: always load what the store holds
        L = kv_pool.num_layers
        self.part_layers = part_layers
        self.parts = [(lo, min(lo + part_layers, L)) for lo in range(0, L, part_layers)]
        self.part_of = [layer // part_layers for layer in range(L)]  # layer -> its part
        self.counters = {"chunks_offered": 0, "chunks_written": 0, "chunks_dropped": 0, "chunks_loaded": 0,
                         "tokens_loaded": 0, "chunks_recompute_chosen": 0, "chunks_corrupt": 0}
        self.level_counts = {lv: 0 for lv in self.levels}
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._known_lock = threading.Lock()
        self._in_flight: dict[tuple[str, str], _WriteJob] = {}  # queued or being written (under _known_lock)
        self._queue: queue.Queue[_WriteJob | None] = queue.Queue(WRITE_QUEUE)
        self._pool = ThreadPoolExecutor(LOAD_WINDOW, thread_name_prefix="kv-store-load")
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="kv-store-prefetch")
        self._writer = threading.Thread(target=self._write_loop, name="kv-store-writer", daemon=True)
        self._writer.start()

    # ---- shapes --------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.kv_pool.channels

    def _kv_key(self, ns: Namespace, chunk_hash: str, lo: int, hi: int, level: str) -> str:
        return ns.key(chunk_hash, kv_part(lo, hi), self._level_keys[level])

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
              erows: torch.Tensor | None) -> list[Future]:
        """Store the chunks of `variant`'s KV of `tokens` that end after `start`.
        `slots` [G, len(tokens)] and `erows` [E, len(tokens)] (0: not kept) are the
        pool locations; they are read now, before the caller frees them. Returns
        the futures of those chunks' writes still in flight (this call's, or an
        earlier one's of the same chunk): when they are done, other engines on a
        shared tier can read the chunks."""
        ns = self.namespace_of(variant)
        C = self.chunk_size
        if ns is None or len(tokens) < C:
            return []
        hashes = chunk_hashes(tokens, C)
        pending = []
        for k in range(start // C, len(hashes)):
            if self._is_known(ns, hashes[k]):
                with self._known_lock:
                    job = self._in_flight.get((ns.model, hashes[k]))
                if job is not None:
                    pending.append(job.written)
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
            job = _WriteJob(ns, hashes[k], self.kv_pool.gather(slots[:, span]), e, k == 0)
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.counters["chunks_dropped"] += 1
                continue
            self._remember(ns, hashes[k])
            with self._known_lock:
                self._in_flight[(ns.model, hashes[k])] = job
            pending.append(job.written)
        return pending

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
                if job is not None:
                    with self._known_lock:
                        self._in_flight.pop((job.ns.model, job.chunk_hash), None)
                    job.written.set_result(None)  # done either way: a waiter must not hang on a lost chunk
                self._queue.task_done()

    def _write(self, job: _WriteJob) -> None:
        L = self.kv_pool.num_layers
        scales = None
        for lo, hi in self.parts:
            keys = {lv: self._kv_key(job.ns, job.chunk_hash, lo, hi, lv) for lv in self.levels}
            if self.store.locate(list(keys.values())) is None:
                if scales is None and self.codec_profile is not None:
                    # every part codes the chunk's tokens with the same steps, from its whole KV
                    scales = token_scales(job.kv, self.codec_profile)
                for lv, key in keys.items():
                    self.store.put(key, encode(job.kv[lo:hi], lv, layers=(lo, L), profile=self.codec_profile,
                                               exact_tokens=int(job.first), token_scales=scales))
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
        future's result, once the load is planned (its fetches then run on), is
        the StoreLoad of the first that the store holds, or None."""
        return self._prefetcher.submit(self._prefetch, key, limit, candidates)

    def _prefetch(self, key, limit, candidates):
        try:
            for variant, start, e_layers in candidates:
                load = self.plan(variant, key, start, limit, e_layers)
                if load is not None:
                    return load
        except Exception:  # a failed prefetch costs a recompute, never the request
            logger.exception("KV store: prefetch failed")
        return None

    def plan(self, variant: int, tokens: list[int], start: int, limit: int,
             e_layers: tuple[int, ...] = ()) -> "StoreLoad | None":
        """Plan and start loading `variant`'s KV for tokens [start, end), end <=
        limit on a chunk boundary: chunk by chunk while the store holds every
        layer part and loading beats recomputing, each chunk at the level the
        streamer picks. The fetches are queued E cache first (`e_layers`: all of
        them or the load carries none), then the KV parts in layer order."""
        ns = self.namespace_of(variant)
        C = self.chunk_size
        if ns is None or (start // C + 1) * C > limit:
            return None
        hashes = chunk_hashes(tokens, C, limit // C)
        budget = None if self.ttft_target_s is None else self.ttft_target_s * C / max(limit - start, 1)
        chunks: list[tuple[int, TierState, str]] = []
        for k in range(start // C, len(hashes)):
            found = self.store.locate_complete(
                {lv: [self._kv_key(ns, hashes[k], lo, hi, lv) for lo, hi in self.parts] for lv in self.levels})
            if found is None:
                break
            state, by_level = found
            level = choose_level(by_level, self.store.bandwidth(state), 0.0, self.cost, budget,
                                  self.cost.prefill_s(k * C, limit - k * C), len(hashes) - k, self.adaptive,
                                  loading=bool(chunks))
            if level is None:
                self.counters["chunks_recompute_chosen"] += 1
                break
            chunks.append((k, state, level))
        if not chunks:
            return None
        e_keys = [[ns.key(hashes[k], e_part(layer), "lossless") for k, _, _ in chunks] for layer in e_layers]
        e_found = self.store.locate_complete({"e": sum(e_keys, [])}) if e_layers else None
        e = None
        if e_found is not None:
            e_shape = (1, C, self.e_pool.h.shape[2])
            e = [[self._pool.submit(self._fetch, e_found[0], key, "lossless", e_shape) for key in keys]
                 for keys in e_keys]
        kv = [[self._pool.submit(self._fetch, state, self._kv_key(ns, hashes[k], lo, hi, level), level,
                                 (hi - lo, C, self.channels)) for k, state, level in chunks]
              for lo, hi in self.parts]
        first = chunks[0][0] * C
        return StoreLoad(variant, ns, [hashes[k] for k, _, _ in chunks], start, first + len(chunks) * C, first,
                         self.parts, kv, e, [level for _, _, level in chunks])

    def bind(self, load: "StoreLoad", start: int, slots: torch.Tensor, erows: torch.Tensor | None,
             temporary_erows: bool = False) -> "PoolLoad":
        """Point `load`'s tokens [start, load.end) at pool `slots` [G, n] and its E
        cache at `erows` [E, n] (None: not kept); they are written as the forward
        reaches each layer (`PoolLoad.ensure`)."""
        return PoolLoad(self, load, start - load.start, slots, erows, temporary_erows)

    def _loaded(self, load: "StoreLoad", tokens: int) -> None:
        """Count a load the pool received whole."""
        for chunk_hash in load.hashes:
            self._remember(load.ns, chunk_hash)
        for lv in load.levels:
            self.level_counts[lv] += 1
        self.counters["chunks_loaded"] += len(load.levels)
        self.counters["tokens_loaded"] += tokens

    def _fetch(self, state, key: str, level: str, shape: tuple[int, int, int]) -> torch.Tensor | None:
        data = self.store.get(state, key)
        if data is None:
            return None
        t0 = time.perf_counter()
        try:
            x = decode(data, self.codec_profile)
            if tuple(x.shape) != shape:
                raise CodecError(f"chunk has shape {list(x.shape)}, this model's KV is {list(shape)}")
        except CodecError as e:
            self.counters["chunks_corrupt"] += 1
            logger.warning("KV store: dropping a bad chunk from the %s tier (%s); recomputing", state.name, e)
            self.store.discard(key)
            return None
        self.cost.observe_decode(level, len(data), time.perf_counter() - t0)
        return x

    def stats(self) -> dict:
        return {"chunk_size": self.chunk_size, "levels": list(self.levels), "adaptive": self.adaptive,
                "ttft_target_ms": None if self.ttft_target_s is None else 1e3 * self.ttft_target_s,
                "part_layers": self.part_layers,
                "prefill_ms_per_chunk_at_4k": 1e3 * self.cost.prefill_s(4096, self.chunk_size),
                **self.counters, "chunks_by_level": dict(self.level_counts), "tiers": self.store.stats()}
