from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

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
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight
        if mates is not None and len(mates) > 1:
            weight = torch.stack([m.weight for m in mates]).index_select(0, groups.row_group)
        return weight * xf.to(dtype)
