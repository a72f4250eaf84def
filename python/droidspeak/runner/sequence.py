"""One token sequence driven by hand through the model runner, outside the
scheduler: offline tools (the cross-model profiler, fine-tune evaluation) and
tests use it to run exact prefill / reuse / recompute experiments on the real
pools and kernels."""
from __future__ import annotations

import torch

from droidspeak.runner.batch import ForwardBatch, ForwardMode, Recompute, recompute_start, sink_tokens


class Sequence:
    """Holds a request row and the slots it allocated; `release()` frees them."""

    def __init__(self, runner):
        self.runner = runner
        self.row = runner.req_to_token_pool.allocate()
        self.length = 0
        self.ids: list[int] = []
        self._owned: list[tuple[torch.Tensor, range]] = []  # (slots, spaces) this sequence allocated
        self._erows: list[torch.Tensor] = []                # [E, n] E rows, in token order

    @property
    def table(self) -> torch.Tensor:
        return self.runner.req_to_token_pool.table[:, self.row]

    @torch.inference_mode()
    def extend(self, ids: list[int], model_id: int = 0, lora_id: int | None = None,
               keep_e: bool = False) -> torch.Tensor:
        """Run `ids` after what the sequence holds with model `model_id`; returns
        fp32 logits for every new position [len(ids), V]. `keep_e` keeps the
        stream entering each E-cache layer (the runner's layout) for these tokens."""
        runner, n, start = self.runner, len(ids), self.length
        slots = runner.allocator.allocate(n)
        self._owned.append((slots, range(runner.allocator.num_spaces)))
        self.table[:, start:start + n] = slots.to(torch.int32)
        batch = ForwardBatch(ForwardMode.EXTEND, torch.tensor(ids, dtype=torch.int64),
                             torch.arange(start, start + n), slots, torch.tensor([self.row]),
                             torch.tensor([start + n]), [start], [n], runner.kv_pool,
                             runner.req_to_token_pool.table, model_ids=[model_id], lora_ids=[lora_id])
        if keep_e:
            erows = runner.e_allocator.allocate(n)
            self._erows.append(erows)
            batch.e_pool, batch.e_loc = runner.e_pool, erows
        self.length += n
        self.ids.extend(ids)
        return runner.forward(batch, torch.arange(n)).extra_logits

    def kv(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V of the first `n` tokens, [layers, n, H_kv, D]."""
        n = self.length if n is None else n
        pool, segs = self.runner.kv_pool, self.runner.kv_pool.segments
        k = torch.stack([pool.k[layer, self.table[segs.segment_of[layer], :n].long()]
                         for layer in range(pool.num_layers)])
        v = torch.stack([pool.v[layer, self.table[segs.segment_of[layer], :n].long()]
                         for layer in range(pool.num_layers)])
        return k, v

    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Start the sequence from given K and V ([layers, n, H_kv, D]) instead of
        computing them, as a cache tier restoring a prefix does."""
        assert self.length == 0
        runner, n = self.runner, k.shape[1]
        slots = runner.allocator.allocate(n)
        self._owned.append((slots, range(runner.allocator.num_spaces)))
        self.table[:, :n] = slots.to(torch.int32)
        segs = runner.kv_pool.segments
        for layer in range(runner.kv_pool.num_layers):
            s = slots[segs.segment_of[layer]]
            runner.kv_pool.k[layer, s] = k[layer].to(runner.kv_pool.dtype)
            runner.kv_pool.v[layer, s] = v[layer].to(runner.kv_pool.dtype)
        self.length = n

    def e_rows(self, layer: int) -> torch.Tensor:
        """This sequence's E-cache rows at `layer`, for every position it kept them."""
        return torch.cat(self._erows, dim=1)[self.runner.e_pool.index[layer]]

    @torch.inference_mode()
    def reuse(self, sender: "Sequence", n: int, group: tuple[int, int] | None,
              model_id: int = 0, lora_id: int | None = None, tail: float = 1.0) -> None:
        """Take the sender's first `n` tokens of KV, as a cross-model hit does:
        every layer is the sender's except `group` = [start, end), which this
        sequence's model recomputes from the sender's E cache at `start` into
        fresh slots, for the last `tail` share of the tokens (`recompute_start`)
        and the attention sink before them (`sink_tokens`).
        `group=None` (or an empty one) is wholesale reuse."""
        assert self.length == 0 and sender.length >= n
        self.table[:, :n] = sender.table[:, :n]
        self.ids = list(sender.ids[:n])
        if group is not None and group[0] < group[1]:
            runner = self.runner
            m = recompute_start(0, n, tail)
            sink = sink_tokens(0, m, group[0])
            spaces = runner.kv_pool.segments.covering(*group)
            for a, b in ((0, sink), (m, n)):
                if b > a:
                    slots = runner.allocator.allocate(b - a, spaces)
                    self._owned.append((slots, spaces))
                    self.table[spaces.start:spaces.stop, a:b] = slots.to(torch.int32)
            e_rows = sender.e_rows(group[0])[m:n] if group[0] > 0 else None
            runner.recompute([Recompute(self.row, m, n, group[0], group[1], e_rows,
                                        torch.tensor(sender.ids[m:n]), model_id, lora_id,
                                        torch.tensor(sender.ids[:sink]) if sink else None)])
        self.length = n

    def release(self) -> None:
        for slots, spaces in self._owned:
            self.runner.allocator.free(slots, spaces)
        for erows in self._erows:
            self.runner.e_allocator.free(erows)
        self._owned, self._erows = [], []
        self.runner.req_to_token_pool.free(self.row)
