"""Linear layers of a co-batched family: each member's rows through its own
weights, in one grouped call where the decode kernel applies."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from droidspeak import kernels

if TYPE_CHECKING:
    from droidspeak.runner.batch import RowGroups


def grouped_linear(mates: list[nn.Module], x: torch.Tensor, groups: "RowGroups | None") -> torch.Tensor:
    """x @ weight^T (+ bias) where `mates[g]` (a module with `weight` [N, K] and
    maybe `bias`) is this layer in group g's member. One member without the
    kernel is a plain matmul; otherwise the kernel groups run in one native call
    and any larger group (prefill, big decode batches) through torch's matmul."""
    weights = [m.weight for m in mates]
    biases = [getattr(m, "bias", None) for m in mates]
    if groups is None:
        return F.linear(x, weights[0], biases[0])
    native = [g for g, n in enumerate(groups.native) if n] if kernels.native_bf16(x) else []
    if native:
        out = kernels.grouped_linear(x, [weights[g] for g in native], [biases[g] for g in native],
                                     [groups.rows[g] for g in native])
    else:
        out = x.new_empty(x.shape[0], weights[0].shape[0])
    for g in range(len(mates)):
        if g not in native:
            r = groups.rows[g]
            out[r] = F.linear(x.index_select(0, r), weights[g], biases[g])
    return out
