from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from droidspeak import kernels
from droidspeak.layers.linear import grouped_linear

if TYPE_CHECKING:
    from droidspeak.runner.batch import ForwardBatch


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused in one matmul."""

    def __init__(self, layer_id: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.layer_id = layer_id
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: "ForwardBatch", mates: "list[SwiGLU] | None" = None) -> torch.Tensor:
        """`mates[g]` is this MLP in group g's member (default: this one alone)."""
        mates = mates or [self]
        gate_up = grouped_linear([m.gate_up_proj for m in mates], x, batch.groups)
        if batch.lora is not None:
            batch.lora.apply(gate_up, x, self.layer_id, "gate_up")
        h = kernels.silu_and_mul(gate_up)
        out = grouped_linear([m.down_proj for m in mates], h, batch.groups)
        if batch.lora is not None:
            batch.lora.apply(out, h, self.layer_id, "down")
        return out
