"""How far a receiver's next-token distributions moved from its own full prefill:
the one definition the profiler, the drift guard and the benchmarks share."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Divergence:
    soft_ce: float   # mean over positions of -sum_v p_ref(v) log p(v)
    entropy: float   # mean entropy of the reference distributions (soft_ce with no change)
    kl: float        # mean KL(p_ref || p)

    @property
    def excess(self) -> float:
        """Relative extra soft cross-entropy over the reference (0.01 = 1%)."""
        return self.soft_ce / self.entropy - 1 if self.entropy > 0 else 0.0


def divergence(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> Divergence:
    """Both [positions, vocab] log-probabilities (log_softmax of the logits)."""
    p_ref = ref_logprobs.exp()
    return Divergence(soft_ce=-(p_ref * logprobs).sum(-1).mean().item(),
                      entropy=-(p_ref * ref_logprobs).sum(-1).mean().item(),
                      kl=F.kl_div(logprobs, ref_logprobs, log_target=True, reduction="none").sum(-1).mean().item())
