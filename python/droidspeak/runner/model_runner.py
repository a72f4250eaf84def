"""Model runner: owns the model weights and the KV memory, runs one ForwardBatch
and returns fp32 logits for the rows the scheduler asked for."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from droidspeak import kernels
from droidspeak.config import EngineConfig, available_memory_bytes
from droidspeak.kvcache.pool import HiddenPool, KVLayout, KVPool, LayerSegments, ReqToTokenPool, SlotAllocator
from droidspeak.lora.adapter import LoRAAdapter
from droidspeak.lora.batch import LoRABatch
from droidspeak.models.config import ModelConfig
from droidspeak.models.loader import load_model
from droidspeak.runner.batch import ForwardBatch, ForwardMode, Recompute, RowGroups

logger = logging.getLogger(__name__)


@dataclass
class LogitsOutput:
    next_token_logits: torch.Tensor  # [B, V] fp32, at each request's last token
    extra_logits: torch.Tensor | None  # [sum(len(rows)), V] fp32 for `extra_rows`


class ModelRunner:
    """`model_paths[0]` is the family's root; every model shares its shape (checked
    by the engine's lineage check), so one KV pool serves them all."""

    def __init__(self, config: EngineConfig, model_paths: list[str] | str, layout: KVLayout = KVLayout()):
        if isinstance(model_paths, str):
            model_paths = [model_paths]
        self.layout = layout
        self.config = config
        self.dtype = config.torch_dtype
        self.model_config = ModelConfig.from_dir(model_paths[0])
        self.context_length = config.context_length or self.model_config.max_position_embeddings
        self.models = [load_model(p, self.dtype, self.context_length) for p in model_paths]
        self.model = self.models[0]
        self.adapters: dict[int, LoRAAdapter] = {}  # LoRA adapters on the root model, by id
        self.max_total_tokens = self._kv_budget()
        mc = self.model_config
        segments = LayerSegments(mc.num_layers, layout.segment_bounds)
        self.kv_pool = KVPool(self.max_total_tokens, mc.num_layers, mc.num_kv_heads, mc.head_dim,
                              self.dtype, segments=segments)
        self.allocator = SlotAllocator(self.max_total_tokens, segments.num_segments)
        self.req_to_token_pool = ReqToTokenPool(config.max_running_requests, self.context_length + 1,
                                                segments.num_segments)
        self.e_pool = self.e_allocator = None
        if layout.e_layers:
            self.e_pool = HiddenPool(self.max_total_tokens, layout.e_layers, mc.hidden_size, self.dtype)
            self.e_allocator = SlotAllocator(self.max_total_tokens, len(layout.e_layers))
        logger.info("KV pool: %d tokens (%.2f GiB), context %d, %d request rows, "
                    "KV segments %s, E cache at layers %s",
                    self.max_total_tokens, self.kv_bytes / 2**30, self.context_length,
                    config.max_running_requests, segments.bounds, list(layout.e_layers) or "none")

    @property
    def kv_bytes_per_token(self) -> int:
        """KV plus E-cache bytes of one token: the E cache counts in the budget."""
        mc = self.model_config
        return (KVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
                + HiddenPool.bytes_per_token(len(self.layout.e_layers), mc.hidden_size, self.dtype))

    def supports_group(self, start: int, end: int) -> bool:
        """Whether this KV layout can recompute layers [start, end): both bounds on
        segment boundaries, and an E cache at `start` unless it is 0 (embeddings)."""
        bounds = self.kv_pool.segments.bounds
        return start >= end or (start in bounds and end in bounds
                                and (start == 0 or start in self.layout.e_layers))

    @property
    def kv_bytes(self) -> int:
        return self.max_total_tokens * self.kv_bytes_per_token

    def _kv_budget(self) -> int:
        if self.config.max_total_tokens is not None:
            return self.config.max_total_tokens
        weight_bytes = sum(p.numel() * p.element_size() for m in self.models for p in m.parameters())
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
        returned (input-token logprobs). A batch that mixes family members runs
        each layer once: norms, attention and the KV store over every row, each
        linear layer per member over its own rows (one grouped call in decode).
        Cross-model recomputes (`batch.recompute`) run first: the extend reads
        their KV. KV-store loads (`batch.loads`) are waited for layer by layer."""
        if batch.recompute:
            self.recompute(batch.recompute, batch.loads)
        ids = batch.model_ids or [0] * batch.batch_size
        row_members = torch.repeat_interleave(torch.tensor(ids, dtype=torch.int64),
                                              torch.tensor(batch.extend_lens, dtype=torch.int64))
        # the grouped kernel also serves an extend of few tokens (a prompt over a
        # cached prefix), where a general GEMM call costs 1.3-2.2x as much
        few_rows = batch.num_tokens <= kernels.GROUPED_KERNEL_MAX_ROWS
        batch.groups = RowGroups.build(row_members, batch.mode is ForwardMode.DECODE or few_rows)
        members = [self.models[m] for m in batch.groups.members] if batch.groups else [self.models[ids[0]]]
        if batch.lora_ids is not None and any(i is not None for i in batch.lora_ids):
            batch.lora = LoRABatch.build(batch.lora_ids, batch.extend_lens, self.adapters)
        lead = members[0]
        hidden = lead(batch, members)
        next_logits = self._logits(lead, members, hidden, batch.last_token_index, batch.groups)
        extra = None
        if extra_rows is not None and extra_rows.numel():
            extra = self._logits(lead, members, hidden, extra_rows, batch.groups)
        return LogitsOutput(next_logits, extra)

    @staticmethod
    def _logits(lead, members, hidden: torch.Tensor, index: torch.Tensor, groups: RowGroups | None) -> torch.Tensor:
        return lead.logits(hidden.index_select(0, index), groups and groups.of_rows(index), members)

    @torch.inference_mode()
    def recompute(self, jobs: list[Recompute], loads: list | None = None) -> None:
        """Run each job's receiver layers over its span from the sender's E cache,
        one ragged batch per (model, layer group). `loads`: KV-store loads in
        flight; the E cache they bring for a recompute is waited for first, their
        KV parts layer by layer."""
        loads = loads or []
        for load in loads:
            if load.temporary_erows:
                load.ensure_e()
        groups: dict[tuple[int, int, int], list[Recompute]] = {}
        for job in jobs:  # a job's sink tokens run in the same pass, as a request of their own
            groups.setdefault((job.model_id, job.layer_start, job.layer_end), []).extend(
                j for j in (job, job.sink_job()) if j is not None)
        table = self.req_to_token_pool.table
        for (model_id, start, end), group in groups.items():
            sub = ForwardBatch(
                mode=ForwardMode.EXTEND,
                input_ids=torch.zeros(sum(j.end - j.start for j in group), dtype=torch.int64),
                positions=torch.cat([torch.arange(j.start, j.end) for j in group]),
                out_cache_loc=torch.cat([table[:, j.req_pool_idx, j.start:j.end] for j in group], 1).long(),
                req_pool_indices=torch.tensor([j.req_pool_idx for j in group], dtype=torch.int64),
                seq_lens=torch.tensor([j.end for j in group], dtype=torch.int64),
                prefix_lens=[j.start for j in group], extend_lens=[j.end - j.start for j in group],
                kv_pool=self.kv_pool, req_to_token=table, model_ids=[model_id] * len(group),
                lora_ids=[j.lora_id for j in group], loads=loads)
            if any(j.lora_id is not None for j in group):
                sub.lora = LoRABatch.build(sub.lora_ids, sub.extend_lens, self.adapters)
            model = self.models[model_id]
            if start == 0:  # from the receiver's own embeddings: no E cache needed
                hidden = model.embed(torch.cat([j.input_ids for j in group]))
            else:
                hidden = torch.cat([self.e_pool.rows(start, j.e_rows) for j in group])
            model.forward_layers(hidden, sub, start, end)
