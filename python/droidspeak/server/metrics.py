"""Prometheus metrics (served at /metrics) and the optional per-request log line."""
from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from droidspeak.scheduler.request import Req

logger = logging.getLogger("droidspeak.requests")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class ServerMetrics:
    def __init__(self, scheduler, model_names: list[str], log_requests: bool = False, name_of=None,
                 queued=None):
        """`name_of(req)` names the model (or adapter) that served a request;
        `queued()` counts the requests admitted and not yet running (default: the
        scheduler's waiting queue)."""
        model_name = model_names[0]
        self.model_names = model_names
        self.name_of = name_of or (lambda req: self.model_names[req.model_id])
        self.registry = CollectorRegistry()
        self.log_requests = log_requests
        labels = {"model_name": model_name}
        r = self.registry
        self.requests = Counter("droidspeak_requests", "Finished requests by finish reason",
                                ["model_name", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("droidspeak_prompt_tokens", "Prompt tokens", ["model_name"], registry=r)
        self.generation_tokens = Counter("droidspeak_generation_tokens", "Generated tokens", ["model_name"],
                                         registry=r)
        self.cached_tokens = Counter("droidspeak_cached_tokens", "Prompt tokens served from the prefix cache",
                                     ["model_name"], registry=r)
        self.ttft = Histogram("droidspeak_time_to_first_token_seconds", "Time to first token", ["model_name"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("droidspeak_inter_token_latency_seconds", "Mean time between output tokens, per request",
                             ["model_name"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("droidspeak_e2e_request_latency_seconds", "End-to-end request latency", ["model_name"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("droidspeak_rejected_requests", "Requests refused by a limit, by reason "
                                "(queue_full: 429, limit: 400, body_size: 413)", ["reason"], registry=r)
        self.aborted = Counter("droidspeak_aborted_requests", "Sub-requests aborted, by cause", ["cause"],
                               registry=r)
        runner = scheduler.runner
        Gauge("droidspeak_num_running_reqs", "Requests decoding", ["model_name"], registry=r).labels(
            **labels).set_function(lambda: len(scheduler.running))
        Gauge("droidspeak_num_queue_reqs", "Requests admitted and not yet running", ["model_name"],
              registry=r).labels(**labels).set_function(queued or (lambda: len(scheduler.waiting)))
        Gauge("droidspeak_kv_pool_usage", "Share of KV slots held by requests or the prefix cache", ["model_name"],
              registry=r).labels(**labels).set_function(
            lambda: 1 - scheduler.allocator.available_size / runner.max_total_tokens)
        Gauge("droidspeak_kv_pool_tokens", "KV pool size in tokens", ["model_name"], registry=r).labels(
            **labels).set(runner.max_total_tokens)
        if getattr(scheduler, "cross_policy", None) is not None:
            r.register(CrossModelCollector(scheduler.cross_policy))
        if getattr(scheduler, "offloader", None) is not None:
            r.register(KVStoreCollector(scheduler.offloader))

    def observe_finished(self, req: Req) -> None:
        reason = req.finish_reason.kind if req.finish_reason else "unknown"
        if req.finish_reason is not None and req.finish_reason.cause is not None:
            self.aborted.labels(cause=req.finish_reason.cause.value).inc()
        model = self.name_of(req)
        self.requests.labels(model_name=model, finish_reason=reason).inc()
        self.prompt_tokens.labels(model_name=model).inc(len(req.origin_input_ids))
        self.generation_tokens.labels(model_name=model).inc(len(req.output_ids))
        self.cached_tokens.labels(model_name=model).inc(req.cached_tokens)
        end = time.perf_counter()
        self.e2e.labels(model_name=model).observe(end - req.created_time)
        if req.first_token_time is not None:
            self.ttft.labels(model_name=model).observe(req.first_token_time - req.created_time)
            if len(req.output_ids) > 1:
                self.itl.labels(model_name=model).observe((end - req.first_token_time) / (len(req.output_ids) - 1))
        if self.log_requests:
            logger.info("model=%s rid=%s prompt=%d cached=%d output=%d finish=%s e2e=%.3fs", model, req.rid,
                        len(req.origin_input_ids), req.cached_tokens, len(req.output_ids), reason,
                        end - req.created_time)


class CrossModelCollector:
    """Per (sender, receiver) pair: cross-model hits, prompt tokens reused, layers
    recomputed (read from the policy's counters at scrape time)."""

    def __init__(self, policy):
        self.policy = policy

    def collect(self):
        families = [
            (CounterMetricFamily("droidspeak_cross_model_hits", "Requests that reused another model's KV",
                                 labels=["sender", "receiver"]), "hits"),
            (CounterMetricFamily("droidspeak_cross_model_reused_tokens", "Prompt tokens reused from another model",
                                 labels=["sender", "receiver"]), "tokens"),
            (CounterMetricFamily("droidspeak_cross_model_recomputed_layers",
                                 "Layers recomputed over reused prompts, summed over hits",
                                 labels=["sender", "receiver"]), "layers_recomputed"),
            (CounterMetricFamily("droidspeak_cross_model_recomputed_token_layers",
                                 "Token x layer pairs recomputed over reused prompts (the compute the hits cost)",
                                 labels=["sender", "receiver"]), "token_layers_recomputed"),
        ]
        stats = list(self.policy.stats.items())
        for family, attr in families:
            for (sender, receiver), st in stats:
                family.add_metric([sender, receiver], getattr(st, attr))
            yield family


class KVStoreCollector:
    """The KV store: chunks stored, dropped and loaded (by level), tokens loaded,
    and per tier hits, bytes, errors, whether it is up and its bandwidth."""

    def __init__(self, offloader):
        self.offloader = offloader

    def collect(self):
        o = self.offloader
        for name in ("chunks_written", "chunks_dropped", "tokens_loaded", "chunks_recompute_chosen",
                     "chunks_corrupt"):
            yield CounterMetricFamily(f"droidspeak_kv_store_{name}", f"KV store: {name.replace('_', ' ')}",
                                      value=o.counters[name])
        loaded = CounterMetricFamily("droidspeak_kv_store_chunks_loaded", "KV store: chunks loaded, by level",
                                     labels=["level"])
        for level, n in o.level_counts.items():
            loaded.add_metric([level], n)
        yield loaded
        tiers = o.store.stats()
        for key, kind in (("hits", CounterMetricFamily), ("errors", CounterMetricFamily),
                          ("bytes_read", CounterMetricFamily), ("bytes_written", CounterMetricFamily),
                          ("up", GaugeMetricFamily), ("bandwidth_bytes_per_s", GaugeMetricFamily)):
            family = kind(f"droidspeak_kv_store_tier_{key}", f"KV store tier: {key.replace('_', ' ')}",
                          labels=["tier"])
            for t in tiers:
                family.add_metric([t["tier"]], float(t[key]))
            yield family
