"""The scheduler: owns the queues and the prefix cache, and each `step()` runs one
prefill batch (if anything can be admitted) or one decode batch, continuous-
batching style. Single-threaded: one caller drives `step()`."""
from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, wait

import torch

from droidspeak.config import EngineConfig
from droidspeak.errors import InvalidRequestError, PromptTooLongError
from droidspeak.kvcache.chunk_cache import NoPrefixCache
from droidspeak.kvcache.lease import Leases
from droidspeak.kvcache.radix_cache import RadixCache
from droidspeak.runner.model_runner import ModelRunner
from droidspeak.sampling.sampler import SamplingRow, sample
from droidspeak.scheduler.decode import build_decode_batch, make_room_for_decode
from droidspeak.scheduler.finish import append_token, finish
from droidspeak.scheduler.output import RequestOutput
from droidspeak.scheduler.policy import order_waiting
from droidspeak.scheduler.prefill import PrefillAdder, build_prefill_batch, decode_reserve
from droidspeak.scheduler.request import AbortCause, FinishReason, Req

logger = logging.getLogger(__name__)

# How much of each running request's remaining max_new_tokens is reserved when
# admitting new work: starts conservative, relaxes each decode step, and snaps back
# after a retraction (SGLang's new_token_ratio schedule).
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001

ABORT_MESSAGES = {
    AbortCause.DISCONNECT: "the client disconnected",
    AbortCause.ABORT_REQUEST: "aborted by the client",
    AbortCause.TIMEOUT: "the request timed out",
    AbortCause.KV_POOL: "the request outgrew the KV pool",
    AbortCause.INTERNAL: "an internal error stopped the request",
}


class StepFailed(RuntimeError):
    """A step raised. The requests it was running were finished with cause
    `internal_error` and everything they held was released (their final outputs
    are `outputs`); every other request is untouched and the scheduler can go on
    stepping. The original exception is `__cause__`."""

    def __init__(self, outputs: list[RequestOutput], error: BaseException):
        super().__init__(f"scheduler step failed ({type(error).__name__}: {error}); "
                         f"{len(outputs)} request(s) failed with it")
        self.outputs = outputs


class Scheduler:
    def __init__(self, config: EngineConfig, runner: ModelRunner, eos_token_ids: list[int],
                 cross_policy=None, offloader=None):
        """`cross_policy` (crossmodel.policy.CrossModelPolicy) enables cross-model
        reuse; the runner's KV layout must be the one it asked for. `offloader`
        (kvstore.offload.KVOffloader) moves evicted KV into the KV store's tiers and
        loads what they hold on a miss."""
        self.config = config
        self.runner = runner
        self.allocator = runner.allocator
        self.req_pool = runner.req_to_token_pool
        cache_cls = NoPrefixCache if config.disable_radix_cache else RadixCache
        self.cache = cache_cls(self.req_pool, self.allocator, runner.e_allocator)
        self.leases = Leases(self.cache, self.req_pool)  # every request holding KV, by its lease
        self.cross_policy = cross_policy
        self.offloader = offloader
        self.pipeline = not config.disable_kv_store_pipeline
        if offloader is not None:
            self.cache.offloader = offloader
            mode = config.kv_store_write
            self.cache.write_through = mode == "through" or (mode == "auto" and any(
                t.name == "redis" for t in offloader.store.tiers))
        self.eos_token_ids = eos_token_ids
        self.context_length = runner.context_length
        self.vocab_size = runner.model_config.vocab_size
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Req | None = None
        # The requests the current step has taken out of the queues for its forward
        # (by id): a failing step fails exactly these.
        self._in_step: dict[int, Req] = {}
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0
        self.num_forward_steps = 0
        self._last_admitted: dict[int, int] = {}  # cache namespace -> step of its last admission
        # Running rows that only a claimant (Req.group) holding no row may take (see EngineConfig).
        self.reserved_rows = min(config.reserved_running_requests or 0, config.max_running_requests - 1)

    # ---- queue operations -------------------------------------------------
    def validate(self, input_ids: list[int], max_new_tokens: int) -> None:
        n = len(input_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", "text")
        bad = [t for t in input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"input_ids holds {bad[0]}, outside [0, {self.vocab_size})", "input_ids")
        if n + max_new_tokens > self.context_length:
            raise PromptTooLongError(
                f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                f"length {self.context_length}", "max_new_tokens" if n < self.context_length else "text")
        if n + 1 > self.runner.max_total_tokens:
            raise PromptTooLongError(
                f"prompt ({n} tokens) does not fit the KV pool ({self.runner.max_total_tokens} tokens)", "text")

    def add_request(self, req: Req) -> None:
        self.validate(req.origin_input_ids, req.sampling_params.max_new_tokens)
        self.enqueue(req)

    def enqueue(self, req: Req) -> None:
        """Queue a validated request (and start its KV-store lookup)."""
        if self.offloader is not None:
            self._start_prefetch(req)
        self.waiting.append(req)

    def _start_prefetch(self, req: Req) -> None:
        """Look the prompt up in the KV store in the background (own model first,
        then the senders a cross-model hit could use); admission waits for it."""
        key = req.cache_key[:req.max_prefix_len]
        variants = [req.cache_variant]
        if self.cross_policy is not None:
            variants += list(self.cross_policy.senders_for(req.cache_variant))
        candidates = []
        for variant in variants:
            e_layers = ()
            if self.cross_policy is not None and self.cross_policy.is_sender(variant) and self.runner.e_pool is not None:
                e_layers = self.runner.e_pool.layers
            candidates.append((variant, self.cache.match_prefix(key, variant).length, e_layers))
        req.store_prefetch = self.offloader.prefetch(key, len(key), candidates)

    def abort_request(self, rid: str, cause: AbortCause = AbortCause.ABORT_REQUEST) -> list[RequestOutput]:
        """Abort every request named `rid`, and every sample of an n > 1 prompt
        given that rid; returns their final outputs (none if nothing matched)."""
        return [self._abort(req, cause) for req in self._take(lambda r: r.rid == rid or r.parent_rid == rid)]

    def abort(self, reqs: list[Req], cause: AbortCause) -> list[RequestOutput]:
        """Abort these request objects wherever they are (queued, chunked or running)."""
        ids = {id(r) for r in reqs}
        return [self._abort(req, cause) for req in self._take(lambda r: id(r) in ids)]

    def abort_all(self, cause: AbortCause) -> list[RequestOutput]:
        """Abort every request in flight and release every lease."""
        outputs = self._fail_in_step(cause, ABORT_MESSAGES[cause])
        outputs += [self._abort(req, cause) for req in self._take(lambda r: True)]
        for req in self.leases.owners():  # held by no queue: a bug, but nothing may leak
            logger.error("request %s held KV outside every queue; releasing it", req.rid)
            outputs.append(self._abort(req, cause))
        return outputs

    def in_flight(self) -> list[Req]:
        """Every request the scheduler holds: queued, or holding KV (chunked,
        running, or inside the step under way). A queued request holds none."""
        return self.waiting + self.leases.owners()

    def _take(self, match) -> list[Req]:
        """Remove the matching requests from the queues and the chunked slot."""
        taken = [r for r in self.waiting + self.running if match(r)]
        if taken:
            self.waiting = [r for r in self.waiting if not match(r)]
            self.running = [r for r in self.running if not match(r)]
        if self.chunked_req is not None and match(self.chunked_req):
            taken.append(self.chunked_req)
            self.chunked_req = None
        return taken

    def _abort(self, req: Req, cause: AbortCause, message: str | None = None) -> RequestOutput:
        future, req.store_prefetch = req.store_prefetch, None
        if future is not None and not future.cancel() and future.done() and future.result() is not None:
            future.result().cancel()  # its fetches still queued
        finish(req, FinishReason("abort", message=message or ABORT_MESSAGES[cause], cause=cause))
        req.release_kv()
        return RequestOutput(req, finished=True)

    def _expire(self, outputs: list[RequestOutput]) -> None:
        """Abort the requests whose deadline has passed."""
        now = time.perf_counter()
        expired = self._take(lambda r: r.deadline is not None and r.deadline <= now)
        outputs.extend(self._abort(r, AbortCause.TIMEOUT) for r in expired)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req)

    @property
    def is_idle(self) -> bool:
        return not self.has_work

    def flush_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while requests are in flight."""
        if self.has_work:
            return False
        self.cache.reset()
        self.allocator.reset()
        if self.runner.e_allocator is not None:
            self.runner.e_allocator.reset()
        self.req_pool.reset()
        return True

    # ---- one iteration ------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One prefill or decode step. A failure inside it fails only the requests
        the step was running (raised as StepFailed, after releasing them)."""
        outputs: list[RequestOutput] = []
        try:
            self._step(outputs)
        except Exception as exc:
            logger.exception("scheduler step failed; failing the %d request(s) it was running",
                             len(self._in_step))
            failed = self._fail_in_step(AbortCause.INTERNAL, f"{ABORT_MESSAGES[AbortCause.INTERNAL]} "
                                                             f"({type(exc).__name__}: {exc})")
            raise StepFailed(outputs + failed, exc) from exc
        self._in_step = {}
        return outputs

    def _fail_in_step(self, cause: AbortCause, message: str) -> list[RequestOutput]:
        """Finish and release the requests of the step under way (see _in_step)."""
        failed = []
        for req in self._in_step.values():
            if req.finished:
                continue  # finished (and released) before the failure
            self._take(lambda r: r is req)
            failed.append(self._abort(req, cause, message))  # releases its lease, load included
        self._in_step = {}
        return failed

    def _step(self, outputs: list[RequestOutput]) -> None:
        self._expire(outputs)
        entries = self._schedule_prefill()
        if entries:
            self._run_prefill(entries, outputs)
        elif self.running:
            self._run_decode(outputs)
        elif waits := [f for r in self.waiting for f in self._store_waits(r)]:
            # Only requests whose KV-store loads are in flight: wait for one.
            wait(waits, timeout=1.0, return_when=FIRST_COMPLETED)
        elif self.has_work:
            # With nothing running, the whole pool is free or evictable and every
            # queued request was validated to fit: not admitting one is a bug.
            raise RuntimeError(f"scheduler stalled: {len(self.waiting)} waiting, "
                               f"{self.allocator.available_size} free slots")
        self.num_forward_steps += 1

    def _store_waits(self, req: Req) -> list:
        """The futures `req` waits on before admission: its KV-store lookup, then,
        unless its load can stream in under its prefill (pipelined, and nothing
        else running that a wait for a layer would hold up), the load's fetches."""
        future = req.store_prefetch
        if future is None:
            return []
        if not future.done():
            return [future]
        load = future.result()
        if load is None or load.done():
            return []
        if self.pipeline and not self.running and self.chunked_req is None:
            return []
        return [f for f in load.futures() if not f.done()]

    def _schedule_prefill(self):
        if not self.waiting and self.chunked_req is None:
            return []
        reserve = sum(decode_reserve(r, self.new_token_ratio) for r in self.running)
        budget = self.allocator.available_size + self.cache.evictable_size - reserve
        adder = PrefillAdder(self.cache, self.allocator, self.leases, self.config.max_prefill_tokens,
                             self.config.chunked_prefill_size, budget, self.new_token_ratio,
                             nothing_running=not self.running, max_models=self.config.max_models_per_batch,
                             active_models={r.cache_namespace for r in self.running},
                             cross_policy=self.cross_policy,
                             idle=not self.running and len(self.waiting) <= 1, offloader=self.offloader)
        if self.chunked_req is not None:
            if not adder.add_chunked(self.chunked_req):
                return []
            self._note_in_step(adder)
            self.chunked_req = None
        max_rows = self.config.max_running_requests
        shared_rows = max_rows - self.reserved_rows
        rows_of = Counter(r.group for r in self.running)
        for req in order_waiting(self.waiting, self.config.schedule_policy, self.cache, self._last_admitted):
            taken = len(self.running) + len(adder.entries)
            if taken >= max_rows:
                break
            if taken >= shared_rows and rows_of[req.group]:
                continue  # the last rows are for claimants that hold none
            if self._store_waits(req):
                continue  # its KV is still on the way from the store; others go first
            if not adder.model_fits(req):
                # Head-of-line model blocked by the model cap: admit nothing more, so
                # the models in the batch drain and this one gets its turn.
                break
            if not adder.add(req):
                break
            self._note_in_step(adder)
            self.waiting.remove(req)
            rows_of[req.group] += 1
            self._last_admitted[req.cache_namespace] = self.num_forward_steps
        return adder.entries

    def _note_in_step(self, adder: PrefillAdder) -> None:
        req = adder.entries[-1].req
        self._in_step[id(req)] = req

    def _run_prefill(self, entries, outputs: list[RequestOutput]) -> None:
        batch, extra_rows, extra_pos = build_prefill_batch(entries, self.runner)
        start = time.perf_counter()
        logits = self.runner.forward(batch, extra_rows)
        failed = {id(r) for r in self._finish_loads(entries)}
        # A forward that waited for the KV store is not a sample of prefill cost.
        if self.cross_policy is not None and not batch.loads:
            token_layers = batch.num_tokens * self.runner.model_config.num_layers + sum(
                (j.end - j.start + (len(j.sink) if j.sink is not None else 0)) * (j.layer_end - j.layer_start)
                for j in batch.recompute)
            self.cross_policy.observe_prefill(time.perf_counter() - start, token_layers)
        if self.offloader is not None and not batch.recompute and not batch.fused_recompute and not batch.loads:
            attended = sum(e.num_tokens * (e.req.kv_len + e.num_tokens / 2) for e in entries)
            self.offloader.cost.observe_prefill(batch.num_tokens, attended, time.perf_counter() - start)
        to_sample, sample_rows = [], []
        extra_offset = 0
        for i, entry in enumerate(entries):
            req = entry.req
            positions = extra_pos[i]
            if id(req) in failed:
                extra_offset += len(positions)
                continue
            # Token 0 has no logprob; it is listed (as None) only when asked for from 0.
            if req.wants_input_logprobs and req.logprob_start_len == 0 and req.kv_len == 0 \
                    and not req.input_token_logprobs:
                req.input_token_logprobs.append((None, req.origin_input_ids[0]))
                req.input_top_logprobs.append(None)
            if positions:
                self._record_input_logprobs(req, positions, logits.extra_logits[extra_offset:extra_offset + len(positions)])
                extra_offset += len(positions)
            req.kv.computed()
            req.kv.checkpoint(req.cache_key)
            if req.kv_len < req.seq_len:
                self.chunked_req = req
            elif req.sampling_params.max_new_tokens == 0:
                finish(req, FinishReason("length", length=0))
                self._release_finished(req, outputs)
            else:
                to_sample.append(req)
                sample_rows.append(i)
        if to_sample:
            self._sample_and_append(to_sample, logits.next_token_logits[sample_rows], outputs)
            self.running.extend(r for r in to_sample if not r.finished)

    def _finish_loads(self, entries) -> list[Req]:
        """Complete the batch's KV-store loads. A request whose load lost a part
        (a tier failed, a corrupt entry) drops everything it holds and goes back
        to the queue's front, to be prefilled from scratch; those are returned."""
        failed = []
        for entry in entries:
            req, load = entry.req, entry.req.kv.load
            if load is None:
                continue
            ok = load.finish()
            req.kv.unbind()
            if not ok:
                logger.warning("KV store: part of request %s's stored prefix did not arrive; "
                               "prefilling it from scratch", req.rid)
                req.release_kv()
                req.admitted_once, req.store_tokens, req.cross_model_tokens = False, 0, 0
                self.waiting.insert(0, req)
                self._in_step.pop(id(req), None)  # queued again, holding nothing
                failed.append(req)
        return failed

    def _record_input_logprobs(self, req: Req, positions: list[int], logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor([req.origin_input_ids[p + 1] for p in positions], dtype=torch.int64)
        chosen = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
        req.input_token_logprobs.extend(zip(chosen, targets.tolist()))
        if req.top_logprobs_num > 0:
            vals, ids = logprobs.topk(req.top_logprobs_num, dim=-1)
            req.input_top_logprobs.extend(list(zip(v, t)) for v, t in zip(vals.tolist(), ids.tolist()))

    def _run_decode(self, outputs: list[RequestOutput]) -> None:
        retracted = make_room_for_decode(self.running, self.cache, self.allocator)
        if retracted:
            self.num_retractions += len(retracted)
            self.new_token_ratio = 1.0
            logger.info("KV pool full: retracted %d request(s); %d still decoding",
                        len(retracted), len(self.running))
            if not self.running:
                # A single request outgrew the whole pool: it cannot continue.
                victim = retracted.pop()
                outputs.append(self._abort(victim, AbortCause.KV_POOL, "the request outgrew the KV pool "
                                                   f"({self.runner.max_total_tokens} tokens)"))
            self.waiting[:0] = retracted
            if not self.running:
                return
        batch = build_decode_batch(self.running, self.allocator, self.runner,
                                   self.cross_policy.is_sender if self.cross_policy else None)
        self._in_step = {id(r): r for r in self.running}
        logits = self.runner.forward(batch)
        for req in self.running:
            req.kv.computed()
        self._sample_and_append(list(self.running), logits.next_token_logits, outputs)
        self.running = [r for r in self.running if not r.finished]
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)

    def _sample_and_append(self, reqs: list[Req], logits: torch.Tensor, outputs: list[RequestOutput]) -> None:
        rows = [SamplingRow(r.sampling_params, r.origin_input_ids, r.output_ids, r.generator,
                            self._banned_ids(r)) for r in reqs]
        result = sample(logits, rows, [r.top_logprobs_num if r.return_logprob else 0 for r in reqs],
                        [r.return_logprob for r in reqs])
        for i, req in enumerate(reqs):
            top = result.top_logprobs[i] if result.top_logprobs is not None else None
            append_token(req, result.token_ids[i], result.logprobs[i], top,
                         self.eos_token_ids, self.context_length)
            if req.finished:
                self._release_finished(req, outputs)
            elif req.stream:
                outputs.append(RequestOutput(req, finished=False))

    def _banned_ids(self, req: Req) -> list[int]:
        p = req.sampling_params
        if len(req.output_ids) >= p.min_new_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)

    def _release_finished(self, req: Req, outputs: list[RequestOutput]) -> None:
        lease, req.kv = req.kv, None
        req.store_writes = lease.commit(req.cache_key)
        outputs.append(RequestOutput(req, finished=True))
