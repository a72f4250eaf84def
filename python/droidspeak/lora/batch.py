"""Per-forward LoRA state: which flat token rows belong to which adapter, and the
segmented low-rank update applied after each base projection (the base matmul has
already run once over every row, as in Punica / S-LoRA)."""
from __future__ import annotations

import torch

from droidspeak.lora.adapter import LoRAAdapter


class LoRABatch:
    def __init__(self, groups: list[tuple[LoRAAdapter, torch.Tensor]]):
        self.groups = groups  # (adapter, flat token rows it owns)

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer_id: int, module: str) -> None:
        """out[rows] += x[rows] @ A^T @ B^T for each adapter's rows, shard by shard."""
        for adapter, rows in self.groups:
            pieces = adapter.weights.get((layer_id, module))
            if not pieces:
                continue
            xr = x.index_select(0, rows)
            for w in pieces:
                delta = (xr @ w.a.t()) @ w.b.t()
                out[rows, w.start:w.end] += delta.to(out.dtype)

    @classmethod
    def build(cls, lora_ids: list[int | None], extend_lens: list[int],
              adapters: dict[int, LoRAAdapter]) -> "LoRABatch | None":
        rows: dict[int, list[torch.Tensor]] = {}
        start = 0
        for lid, n in zip(lora_ids, extend_lens):
            if lid is not None:
                rows.setdefault(lid, []).append(torch.arange(start, start + n))
            start += n
        if not rows:
            return None
        return cls([(adapters[lid], torch.cat(parts)) for lid, parts in rows.items()])
