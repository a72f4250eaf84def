from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(self, x: torch.Tensor, batch: "ForwardBatch") -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if batch.lora is not None:
            batch.lora.apply(gate_up, x, self.layer_id, "gate_up")
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        h = F.silu(gate) * up
        out = self.down_proj(h)
        if batch.lora is not None:
            batch.lora.apply(out, h, self.layer_id, "down")
        return out
