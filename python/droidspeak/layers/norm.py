from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from droidspeak import kernels

if TYPE_CHECKING:
    from droidspeak.runner.batch import RowGroups


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in fp32, scale in the input dtype (as transformers)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, groups: "RowGroups | None" = None,
                mates: "list[RMSNorm] | None" = None) -> torch.Tensor:
        """`mates[g]` is this norm in group g's member: each row is scaled by its
        own member's weight (the same arithmetic as running that member alone)."""
        if mates is not None and len(mates) > 1:
            return kernels.rmsnorm(x, torch.stack([m.weight for m in mates]), groups.row_group, self.eps)
        return kernels.rmsnorm(x, self.weight, None, self.eps)
