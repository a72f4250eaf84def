"""Engine configuration. CLI flags are generated from these fields (names as SGLang's
where they apply); "auto" values are resolved once at start-up and logged."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import torch

from droidspeak.errors import InvalidRequestError

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
SCHEDULE_POLICIES = ("lpm", "fcfs")


@dataclass(frozen=True)
class EngineConfig:
    model_path: str | None = field(
        default=None,
        metadata={"help": 'Local Hugging Face directory or .gguf file; None = the embedded default model.'})
    served_model_name: str | None = field(
        default=None,
        metadata={"help": "Name of the model given by model_path in the APIs; default: its directory's name."})
    models: tuple[str, ...] = field(
        default=(),
        metadata={"help": "More models of the same family, NAME=PATH each (repeatable: --model a=/p/a --model b=/p/b)."})
    models_file: str | None = field(
        default=None,
        metadata={"help": "TOML or YAML file naming the family: [base], [models], [lora] (see README)."})
    lora_paths: tuple[str, ...] = field(
        default=(),
        metadata={"help": "LoRA adapters (PEFT format) on the root model, NAME=PATH each."})
    remote_senders: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Family members this engine does not host whose KV it may reuse from the KV store, "
                          "NAME=FINGERPRINT each (the fingerprint /model_info reports where the member is served; "
                          "repeatable). Needs --kv-store and a profile for each pair."})
    dtype: str = field(
        default="auto",
        metadata={"help": 'auto (bfloat16 on CPUs with AVX512-BF16 or AMX, else float32), bfloat16, float32, float16.'})
    context_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt + output; default: the model's max_position_embeddings."})
    max_total_tokens: int | None = field(
        default=None,
        metadata={"help": 'KV pool size in tokens; default: derived from mem_fraction_static.'})
    mem_fraction_static: float = field(
        default=0.4,
        metadata={"help": "Share of the host's available memory for weights plus the KV pool."})
    max_running_requests: int = field(
        default=64,
        metadata={"help": 'Most requests decoding at once (rows of the request-to-token table).'})
    max_queued_requests: int | None = field(
        default=None,
        metadata={"help": "Most requests admitted but not yet running (queued, tokenizing or waiting for KV); "
                          "past it new work gets HTTP 429 with Retry-After; default: "
                          "max(2 x max_running_requests, KV pool tokens / 256)."})
    reserved_running_requests: int | None = field(
        default=None,
        metadata={"help": "Running rows kept for claimants that hold none (clients when the server limits per "
                          "client, else API calls), so one that fans out to many sub-requests or floods small ones "
                          "cannot make another's request wait for its decodes; default: max_running_requests / 8 "
                          "when serving over HTTP, 0 offline."})
    max_requests_per_client: int | None = field(
        default=None,
        metadata={"help": "Most sub-requests one client (by peer address) may have queued or running; past it "
                          "its new work gets 429, so one client cannot fill the queue for everyone; default: half "
                          "of max_running_requests + max_queued_requests; 0: no per-client limit (set it when "
                          "every request comes through one router's address)."})
    max_n: int = field(default=128, metadata={"help": "Most samples (n) one prompt may ask for (OpenAI's cap)."})
    max_prompts_per_request: int = field(
        default=256, metadata={"help": "Most prompts in one batched request (a list in text / input_ids / prompt)."})
    max_fanout_per_request: int = field(
        default=256,
        metadata={"help": "Most sub-requests one request may fan out to: prompts x n, summed over its prompts."})
    request_timeout_s: float | None = field(
        default=None,
        metadata={"help": "Finish a request that has not finished after this many seconds (finish_reason abort, "
                          "cause timeout) and free its KV; a request's own request_timeout_s field may set a "
                          "shorter or longer one; default: none."})
    max_models_per_batch: int = field(
        default=8,
        metadata={"help": "Most distinct models and adapters decoding at once (each adds its own linear or LoRA work)."})
    max_prefill_tokens: int = field(default=16384, metadata={"help": 'Token budget of one prefill batch.'})
    chunked_prefill_size: int = field(
        default=2048,
        metadata={"help": 'Longest prefill chunk of one request; -1 disables chunking.'})
    schedule_policy: str = field(
        default="lpm",
        metadata={"help": 'lpm (longest cached prefix first) or fcfs.'})
    disable_radix_cache: bool = field(
        default=False,
        metadata={"help": "Cache no prefixes (every request prefills from scratch)."})
    cross_model_profiles: str | None = field(
        default=None,
        metadata={"help": "Directory of cross-model profiles (droidspeak profile); default: "
                          "$DROIDSPEAK_CACHE/profiles/<root model name>."})
    cross_model_quality: float = field(
        default=0.01,
        metadata={"help": "Cross-model reuse must stay within this relative cross-entropy of full "
                          "prefill on the pair's profile (0.01: one percent)."})
    cross_model_idle_ttft_ms: float | None = field(
        default=None,
        metadata={"help": "When nothing else is queued, recompute the pair's best group with the same E "
                          "cache instead if its estimated prefill time stays under this TTFT (ms); "
                          "default: always the smallest group meeting the quality target."})
    cross_model_drift_check_s: float = field(
        default=30.0,
        metadata={"help": "When idle, replay a sampled recent cross-model hit against full prefill at most "
                          "this often (seconds) and re-target drifted pairs; 0 disables."})
    disable_cross_model: bool = field(
        default=False,
        metadata={"help": "Never reuse another model's KV (every model prefills its own)."})
    kv_store: str | None = field(
        default=None,
        metadata={"help": "Keep KV that the prefix cache evicts, compressed, in these tiers (comma-separated, "
                          "fastest first): ram, disk[:DIR], redis://HOST:PORT[/DB]. A prompt the cache misses "
                          "loads the chunks they hold; a Redis tier is shared by every engine pointed at it."})
    kv_store_ram_mb: int = field(default=2048, metadata={"help": "Size cap of the compressed RAM tier (MiB)."})
    kv_store_disk_dir: str | None = field(
        default=None, metadata={"help": "Directory of the disk tier; default: $DROIDSPEAK_CACHE/kvstore."})
    kv_store_disk_gb: float = field(default=20.0, metadata={"help": "Size cap of the disk tier (GiB)."})
    kv_store_chunk_size: int = field(default=256, metadata={"help": "Tokens per stored KV chunk."})
    kv_store_levels: str = field(
        default="high,low",
        metadata={"help": "CacheGen levels each chunk is stored at (lossless, high, medium, low); the "
                          "streamer picks one per chunk by bandwidth."})
    kv_store_write: str = field(
        default="auto",
        metadata={"help": "evict: store chunks when the prefix cache evicts them; through: also store every "
                          "finished request's chunks at once (what sharing needs); auto: through when a Redis "
                          "tier is configured, else evict."})
    kv_store_ttft_ms: float | None = field(
        default=None,
        metadata={"help": "TTFT target for loading a stored prefix: per chunk, the best level whose fetch and "
                          "decode fit the chunk's share; default: the best level that beats recomputing."})
    kv_store_load: str = field(
        default="adaptive",
        metadata={"help": "adaptive: per chunk, load at the level that fits or recompute when that is faster; "
                          "always: load every stored chunk (at the best level that fits the TTFT target, else "
                          "the fastest), never recompute what the store holds."})
    kv_store_bandwidth_mbps: float | None = field(
        default=None, metadata={"help": "Assume this link bandwidth (MB/s) instead of measuring it."})
    kv_store_part_layers: int = field(
        default=6,
        metadata={"help": "Layers per stored KV part: loading runs ahead of compute by this unit (the prefill "
                          "waits for a layer's part only when it reaches that layer)."})
    kv_store_codec_profile: str | None = field(
        default=None,
        metadata={"help": "Codec profile of the root model for the lossy levels (`droidspeak codec-profile` "
                          "makes one; about 1.6x smaller chunks at equal quality); default: the one in "
                          "$DROIDSPEAK_CACHE/codec_profiles if it exists; 'none': code without one."})
    disable_kv_store_pipeline: bool = field(
        default=False,
        metadata={"help": "Admit a request only once its whole stored prefix has arrived. By default, when "
                          "nothing else is running, it is admitted at once and its prefill (and a cross-model "
                          "recompute, E cache first) runs while the later layers still stream in."})
    random_seed: int = field(
        default=0,
        metadata={"help": "Seed of the per-request samplers of requests that give no sampling_seed."})
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch intra-op threads; default: torch's choice (all cores)."})

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}", "dtype")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise InvalidRequestError(
                f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}",
                "schedule_policy")
        if not 0 < self.mem_fraction_static <= 1:
            raise InvalidRequestError("mem_fraction_static must be in (0, 1]", "mem_fraction_static")
        for entry in self.models + self.lora_paths:
            if not isinstance(entry, str) or "=" not in entry or not entry.split("=", 1)[0]:
                raise InvalidRequestError(f"models entries are NAME=PATH, got {entry!r}", "models")
        for entry in self.remote_senders:
            if not isinstance(entry, str) or "=" not in entry or not all(entry.split("=", 1)):
                raise InvalidRequestError(f"remote_senders entries are NAME=FINGERPRINT, got {entry!r}",
                                          "remote_senders")
        if self.remote_senders and not self.kv_store:
            raise InvalidRequestError("remote_senders reuse KV from the KV store: set kv_store too",
                                      "remote_senders")
        if self.reserved_running_requests is not None and self.reserved_running_requests < 0:
            raise InvalidRequestError("reserved_running_requests must be >= 0", "reserved_running_requests")
        if self.max_requests_per_client is not None and self.max_requests_per_client < 0:
            raise InvalidRequestError("max_requests_per_client must be >= 0", "max_requests_per_client")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise InvalidRequestError("max_queued_requests must be >= 0", "max_queued_requests")
        for name in ("max_n", "max_prompts_per_request", "max_fanout_per_request"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1", name)
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise InvalidRequestError("request_timeout_s must be > 0", "request_timeout_s")
        if self.max_models_per_batch < 1:
            raise InvalidRequestError("max_models_per_batch must be >= 1", "max_models_per_batch")
        if not 0 <= self.cross_model_quality < 1:
            raise InvalidRequestError("cross_model_quality must be in [0, 1)", "cross_model_quality")
        if self.kv_store_write not in ("auto", "evict", "through"):
            raise InvalidRequestError("kv_store_write must be auto, evict or through", "kv_store_write")
        if self.kv_store_load not in ("adaptive", "always"):
            raise InvalidRequestError("kv_store_load must be adaptive or always", "kv_store_load")
        if self.kv_store_part_layers < 1:
            raise InvalidRequestError("kv_store_part_layers must be >= 1", "kv_store_part_layers")
        if self.kv_store_chunk_size < 16:
            raise InvalidRequestError("kv_store_chunk_size must be >= 16", "kv_store_chunk_size")
        if self.kv_store and self.disable_radix_cache:
            raise InvalidRequestError("kv_store needs the radix cache (drop --disable-radix-cache)", "kv_store")
        if self.chunked_prefill_size != -1 and self.chunked_prefill_size < 1:
            raise InvalidRequestError("chunked_prefill_size must be -1 or >= 1", "chunked_prefill_size")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.resolved_dtype]

    @property
    def resolved_dtype(self) -> str:
        return cpu_default_dtype() if self.dtype == "auto" else self.dtype

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def cpu_default_dtype() -> str:
    """bfloat16 where the CPU has native bf16 matrix support, else float32."""
    from droidspeak import cpu
    return cpu.default_dtype()


def available_memory_bytes() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def parse_model_entries(entries: tuple[str, ...]) -> list[tuple[str, str]]:
    return [tuple(e.split("=", 1)) for e in entries]
