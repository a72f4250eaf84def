"""Model runner: owns the model weights and the KV memory, runs one ForwardBatch
and returns fp32 logits for the rows the scheduler asked for."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from droidspeak.config import EngineConfig, available_memory_bytes
from droidspeak.kvcache.pool import KVPool, ReqToTokenPool, SlotAllocator
from droidspeak.models.config import ModelConfig
from droidspeak.models.loader import load_model
from droidspeak.runner.batch import ForwardBatch

logger = logging.getLogger(__name__)


@dataclass
class LogitsOutput:
    next_token_logits: torch.Tensor  # [B, V] fp32, at each request's last token
    extra_logits: torch.Tensor | None  # [sum(len(rows)), V] fp32 for `extra_rows`


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str):
        self.config = config
        self.dtype = config.torch_dtype
        self.model_config = ModelConfig.from_dir(model_path)
        self.context_length = config.context_length or self.model_config.max_position_embeddings
        self.model = load_model(model_path, self.dtype, self.context_length)
        self.max_total_tokens = self._kv_budget()
        mc = self.model_config
        self.kv_pool = KVPool(self.max_total_tokens, mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        self.allocator = SlotAllocator(self.max_total_tokens)
        self.req_to_token_pool = ReqToTokenPool(config.max_running_requests, self.context_length + 1)
        logger.info("KV pool: %d tokens (%.2f GiB), context %d, %d request rows",
                    self.max_total_tokens, self.kv_bytes / 2**30, self.context_length,
                    config.max_running_requests)

    @property
    def kv_bytes_per_token(self) -> int:
        mc = self.model_config
        return KVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)

    @property
    def kv_bytes(self) -> int:
        return self.max_total_tokens * self.kv_bytes_per_token

    def _kv_budget(self) -> int:
        if self.config.max_total_tokens is not None:
            return self.config.max_total_tokens
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        budget = available_memory_bytes() * self.config.mem_fraction_static - weight_bytes
        tokens = int(budget // self.kv_bytes_per_token)
        if tokens < self.context_length:
            raise MemoryError(
                f"mem_fraction_static={self.config.mem_fraction_static} leaves room for "
                f"{max(tokens, 0)} KV tokens, less than one context ({self.context_length}); "
                "raise it or set max_total_tokens")
        return tokens

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, extra_rows: torch.Tensor | None = None) -> LogitsOutput:
        """Run the batch. `extra_rows` are flat token indices whose logits are also
        returned (input-token logprobs)."""
        hidden = self.model(batch)
        last = hidden.index_select(0, batch.last_token_index)
        extra = None
        if extra_rows is not None and extra_rows.numel():
            extra = self.model.logits(hidden.index_select(0, extra_rows))
        return LogitsOutput(self.model.logits(last), extra)
