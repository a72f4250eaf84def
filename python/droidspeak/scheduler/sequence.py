"""One token sequence driven by hand outside the scheduler, through the serving
path's own pieces: offline tools (the cross-model profiler, fine-tune
evaluation, codec calibration), the drift guard and tests use it to run exact
prefill / reuse / recompute experiments on the real pools and kernels.

Its KV is a `KVLease`; a cross-model reuse is planned by `plan_cross`, taken by
`take_cross` and recomputed by the `recompute_job` that admission builds, and
every forward is a `build_prefill_batch` of one entry, so what a profile scores
is the code path a served request runs.
"""
from __future__ import annotations

import torch

from droidspeak.kvcache.chunk_cache import NoPrefixCache
from droidspeak.kvcache.lease import KVLease
from droidspeak.scheduler.prefill import PrefillEntry, build_prefill_batch, plan_cross, recompute_job, take_cross


class Sequence:
    """A request row and what it holds (`release()` gives it back). Presents the
    fields `build_prefill_batch` reads of a request."""

    wants_input_logprobs = True  # logits for every new position, not only the last

    def __init__(self, runner):
        self.runner = runner
        pool = runner.req_to_token_pool
        cache = NoPrefixCache(pool, runner.allocator, runner.e_allocator)  # it owns every slot it takes
        self.kv = KVLease(cache, pool, 0, pool.allocate())
        self.ids: list[int] = []
        self.model_id, self.lora_id = 0, None
        self._recompute = None  # a cross-model recompute the next extend runs, as a served prefill does

    # ---- what build_prefill_batch reads ---------------------------------------------
    @property
    def kv_len(self) -> int:
        return self.kv.kv_len

    @property
    def fill_ids(self) -> list[int]:
        return self.ids

    @property
    def origin_input_ids(self) -> list[int]:
        return self.ids

    @property
    def logprob_start_len(self) -> int:
        return self.kv.kv_len + 1

    @property
    def length(self) -> int:
        return self.kv.kv_len

    @property
    def table(self) -> torch.Tensor:
        return self.runner.req_to_token_pool.table[:, self.kv.row]

    @torch.inference_mode()
    def extend(self, ids: list[int], model_id: int = 0, lora_id: int | None = None,
               keep_e: bool = False) -> torch.Tensor:
        """Run `ids` after what the sequence holds with model `model_id` (after a
        `reuse`, with its recompute in the same forward); returns fp32 logits for
        every new position [len(ids), V]. `keep_e` keeps the stream entering each
        E-cache layer (the runner's layout) for these tokens."""
        n = len(ids)
        self.ids.extend(ids)
        self.model_id, self.lora_id = model_id, lora_id
        self.kv.grow(n, keep_e)
        entry, self._recompute = PrefillEntry(self, n, self._recompute), None
        batch, extra_rows, _ = build_prefill_batch([entry], self.runner)
        out = self.runner.forward(batch, extra_rows)
        self.kv.computed()
        if out.extra_logits is None:  # one token: its logits are the next-token ones
            return out.next_token_logits
        return torch.cat([out.extra_logits, out.next_token_logits])

    def kv_tensors(self, n: int | None = None) -> torch.Tensor:
        """[layers, n, channels] copy of the KV of the first `n` tokens (KVPool.gather)."""
        n = self.length if n is None else n
        return self.runner.kv_pool.gather(self.table[:, :n].to(torch.int64))

    def load(self, kv: torch.Tensor) -> None:
        """Start the sequence from given KV ([layers, n, channels], as `kv_tensors`)
        instead of computing it, as a cache tier restoring a prefix does."""
        assert self.length == 0
        n = kv.shape[1]
        self.kv.grow(n, with_e=False)
        self.runner.kv_pool.scatter(kv, 0, kv.shape[0], self.table[:, :n].to(torch.int64))
        self.kv.computed()
        self.ids = [0] * n  # positions only: the tokens are not known

    def e_rows(self, layer: int) -> torch.Tensor:
        """This sequence's E-cache rows at `layer`, for every position it kept them."""
        return torch.cat(self.kv.erows, dim=1)[self.runner.e_pool.index[layer]]

    def reuse(self, sender: "Sequence", n: int, group: tuple[int, int] | None,
              model_id: int = 0, lora_id: int | None = None, tail: float = 1.0) -> None:
        """Take the sender's first `n` tokens of KV, as a cross-model hit does:
        every layer is the sender's except `group` = [start, end), which this
        sequence's model recomputes from the sender's E cache at `start` into
        fresh slots, for the last `tail` share of the tokens and the attention
        sink before them, in the next `extend`'s forward. `group=None` (or an
        empty one) is wholesale reuse."""
        assert self.length == 0 and sender.length >= n
        group = group if group is not None else (0, 0)
        cross = plan_cross(0, 0, n, group, tail, self.runner.kv_pool.segments, sender.table[:, :n])
        self.kv.prefix_len = self.kv.kv_len = self.kv.end = n  # the sender's: it must outlive this sequence
        take_cross(self.kv, cross)
        self.ids = list(sender.ids[:n])
        e_rows = sender.e_rows(group[0])[:n] if cross.recomputes and group[0] > 0 else None
        self._recompute = recompute_job(self.kv.row, cross, self.ids, model_id, lora_id, e_rows)

    def release(self) -> None:
        self._recompute = None
        self.kv.release()
