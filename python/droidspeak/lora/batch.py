"""Per-forward LoRA state: which flat token rows belong to which adapter, and the
segmented low-rank update applied after each base projection (the base matmul has
already run once over every row, as in Punica / S-LoRA)."""
from __future__ import annotations

import torch

from droidspeak import kernels
from droidspeak.lora.adapter import LoRAAdapter


# The fused projections an adapter may update, in the order of kernels.LoRAStack's slots.
MODULES = ("qkv", "o", "gate_up", "down")


class LoRABatch:
    def __init__(self, groups: list[tuple[LoRAAdapter, torch.Tensor]]):
        self.groups = groups  # (adapter, flat token rows it owns)

    def native(self, num_layers: int) -> tuple[list, list[torch.Tensor]]:
        """The adapters as native stacks (built once per adapter) and their rows,
        for `kernels.LayerStack.run`."""
        stacks = []
        for adapter, _ in self.groups:
            if adapter.native is None:
                layers = []
                for i in range(num_layers):
                    slots = []
                    for module in MODULES:
                        w = adapter.weights.get((i, module))
                        slots += [w.a, w.b] if w is not None else [None, None]
                    layers.append(slots)
                adapter.native = kernels.LoRAStack(layers)
            stacks.append(adapter.native)
        return stacks, [rows for _, rows in self.groups]

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer_id: int, module: str) -> None:
        """out[rows] += x[rows] @ A^T @ B^T for each adapter's rows (every shard
        of the fused projection in the same two matmuls)."""
        for adapter, rows in self.groups:
            w = adapter.weights.get((layer_id, module))
            if w is None:
                continue
            xr = x.index_select(0, rows)
            if rows.numel() <= kernels.GROUPED_KERNEL_MAX_ROWS and kernels.native_bf16(xr):
                # decode: two tiny matmuls, cheaper through the grouped kernel
                # than through a general GEMM call each
                whole = [torch.arange(rows.numel())]
                u = kernels.grouped_linear(xr, [w.a], [None], whole)
                delta = kernels.grouped_linear(u, [w.b], [None], whole)
            else:
                delta = (xr @ w.a.t()) @ w.b.t()
            out.index_add_(0, rows, delta.to(out.dtype))

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
