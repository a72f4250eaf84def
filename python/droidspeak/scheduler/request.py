"""Request state as the scheduler sees it."""
from __future__ import annotations

import enum
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from droidspeak.kvcache.lease import KVLease
from droidspeak.sampling.params import SamplingParams
from droidspeak.tokenizer.detokenizer import IncrementalDetokenizer

# A logprob entry: (logprob or None for the first prompt token, token id).
Logprob = tuple[float | None, int]


class AbortCause(str, enum.Enum):
    """Why a request was aborted (the `cause` of an abort finish reason)."""
    DISCONNECT = "disconnect"          # its client went away
    ABORT_REQUEST = "abort_request"    # /abort_request named it
    TIMEOUT = "timeout"                # it outlived its request_timeout_s
    KV_POOL = "kv_pool"                # it outgrew the whole KV pool
    INTERNAL = "internal_error"        # a step failed under it


@dataclass
class FinishReason:
    kind: str                       # "stop" | "length" | "abort"
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None
    cause: AbortCause | None = None  # set for "abort"

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"type": self.kind}
        if self.kind == "stop":
            out["matched"] = self.matched
        elif self.kind == "length":
            out["length"] = self.length
        else:
            out["message"] = self.message
            if self.cause is not None:
                out["cause"] = self.cause.value
        return out


@dataclass
class Req:
    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator
    return_logprob: bool = False
    logprob_start_len: int = -1   # -1: no input-token logprobs
    top_logprobs_num: int = 0
    stream: bool = False
    model_id: int = 0             # which family member serves this request
    lora_id: int | None = None    # LoRA adapter applied on top of that member
    cache_namespace: int = 0      # prefix-cache variant: one per model and per adapter
    parent_rid: str | None = None  # the rid the caller gave, for each sample of an n > 1 prompt
    group: Hashable = 0           # who admission shares rows between (scheduler.policy): the API
                                  # call offline, the client (its address) when the server tells them apart
    deadline: float | None = None  # perf_counter time past which the request is aborted

    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    output_text: str = ""         # detokenized output, trimmed at a matched stop string

    kv: KVLease | None = None     # what it holds in KV memory, from admission to its finish
    cached_tokens: int = 0        # prompt tokens served from the prefix cache
    cross_model_tokens: int = 0   # of those, tokens reused from another model
    store_tokens: int = 0         # of those, tokens loaded from the KV store's tiers
    store_prefetch: Any = None    # Future of the KV store load planned on arrival (kvstore.offload)
    wait_for_kv_store: bool = False  # answer only once its write-through chunks are in the store's tiers
    store_writes: list = field(default_factory=list)  # Futures of those writes (set at finish)
    admitted_once: bool = False
    num_retractions: int = 0

    input_token_logprobs: list[Logprob] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_token_logprobs: list[Logprob] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)

    created_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    sent_output_len: int = 0      # output tokens already reported to the caller

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def cache_key(self) -> list[int]:
        return self.fill_ids

    @property
    def cache_variant(self) -> int:
        return self.cache_namespace

    def release_kv(self) -> None:
        """Give back everything the request holds (abort, retraction, a failed
        load or step); it may be admitted again later."""
        lease, self.kv = self.kv, None
        if lease is not None:
            lease.release()

    @property
    def kv_len(self) -> int:
        """Leading tokens of fill_ids whose KV the request holds."""
        return self.kv.kv_len if self.kv is not None else 0

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def extend_len(self) -> int:
        return self.seq_len - self.kv_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.output_ids

    @property
    def max_prefix_len(self) -> int:
        """Longest prefix that may come from the cache. The last token always runs
        (it produces the next-token logits), and input logprobs need the hidden
        state of every position from logprob_start_len - 1 on."""
        limit = self.seq_len - 1
        if self.wants_input_logprobs:
            limit = min(limit, max(self.logprob_start_len - 1, 0))
        return limit
