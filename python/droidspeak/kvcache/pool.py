"""KV memory: a token-slot pool per layer, the reference-counted slot allocator,
the request-to-token table (SGLang's token_to_kv_pool / req_to_token_pool), and
the hidden-state pool that holds the cross-model E cache.

Layers are split into contiguous *segments*, each with its own slot index space.
With one segment (no cross-model profiles) a slot means a token's KV in every
layer, as in SGLang. With several, a token's KV is one slot per segment, so a
receiver that recomputes the layers of one segment and reuses a sender's KV for
the others holds new memory only in the recomputed segment.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """How the pool is cut for cross-model reuse: KV segment boundaries (every
    recompute group's start and end) and the layers whose input stream is kept
    as the E cache. The default (no profiles) is one segment and no E cache."""
    segment_bounds: tuple[int, ...] = ()
    e_layers: tuple[int, ...] = ()


class LayerSegments:
    """Contiguous layer ranges [bounds[g], bounds[g + 1]), one slot space each."""

    def __init__(self, num_layers: int, boundaries: tuple[int, ...] | list[int] = ()):
        bad = [b for b in boundaries if not 0 <= b <= num_layers]
        if bad:
            raise ValueError(f"segment boundary {bad[0]} outside [0, {num_layers}]")
        self.num_layers = num_layers
        self.bounds = tuple(sorted({0, num_layers, *boundaries}))
        self.segment_of = [0] * num_layers
        for g in range(self.num_segments):
            for layer in range(self.bounds[g], self.bounds[g + 1]):
                self.segment_of[layer] = g

    @property
    def num_segments(self) -> int:
        return len(self.bounds) - 1

    def covering(self, start: int, end: int) -> range:
        """The segments that make up layers [start, end); the range must be aligned."""
        if start not in self.bounds or end not in self.bounds or start > end:
            raise ValueError(f"layers [{start}, {end}) are not aligned to segments {self.bounds}")
        return range(self.bounds.index(start), self.bounds.index(end))


class KVPool:
    """K and V for `size` token slots in every layer: [num_layers, size + 1, H_kv, D].
    Layer l of slot i belongs to slot i of segment `segments.segment_of[l]`.

    Slot 0 is a padding slot that is never handed out, so a zeroed index is always
    safe to read (and to write: writes to it are discarded data).
    """

    def __init__(self, size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str = "cpu", segments: LayerSegments | None = None):
        self.size = size
        self.num_layers = num_layers
        self.dtype = dtype
        self.segments = segments or LayerSegments(num_layers)
        shape = (num_layers, size + 1, num_kv_heads, head_dim)
        # torch.empty leaves pages untouched until used, so a large budget costs
        # resident memory only as it fills.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, 0].zero_()
        self.v[:, 0].zero_()

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer_id], self.v[layer_id]

    @property
    def channels(self) -> int:
        """K and V of one token in one layer, flattened: 2 * H_kv * D."""
        return 2 * self.k.shape[2] * self.k.shape[3]

    # The one copy between the pool and host tensors (the KV store, offline tools).
    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """[layers, n, channels] copy of the KV of `slots` ([G, n], one row per
        segment): K then V of each token."""
        bounds, n = self.segments.bounds, slots.shape[1]
        parts = []
        for g in range(len(bounds) - 1):
            lo, hi = bounds[g], bounds[g + 1]
            k = self.k[lo:hi].index_select(1, slots[g]).reshape(hi - lo, n, -1)
            v = self.v[lo:hi].index_select(1, slots[g]).reshape(hi - lo, n, -1)
            parts.append(torch.cat([k, v], dim=2))
        return torch.cat(parts, dim=0)

    def scatter(self, kv: torch.Tensor, lo: int, hi: int, slots: torch.Tensor) -> None:
        """Write `kv` [hi - lo, n, channels] (layout of `gather`), layers [lo, hi),
        to `slots` ([G, n])."""
        half, shape = kv.shape[2] // 2, self.k.shape[2:]
        kv = kv.to(self.dtype)
        for layer in range(lo, hi):
            g = self.segments.segment_of[layer]
            self.k[layer].index_copy_(0, slots[g], kv[layer - lo, :, :half].reshape(-1, *shape))
            self.v[layer].index_copy_(0, slots[g], kv[layer - lo, :, half:].reshape(-1, *shape))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class HiddenPool:
    """The E cache: the residual stream entering each of `layers`, per token row:
    [len(layers), size + 1, hidden]. Row 0 is padding (absent / discarded)."""

    def __init__(self, size: int, layers: tuple[int, ...], hidden_size: int, dtype: torch.dtype,
                 device: str = "cpu"):
        self.size = size
        self.layers = tuple(layers)
        self.index = {layer: j for j, layer in enumerate(self.layers)}
        self.h = torch.empty((len(self.layers), size + 1, hidden_size), dtype=dtype, device=device)
        self.h[:, 0].zero_()

    def store(self, layer: int, e_loc: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep `hidden` (the stream entering `layer`) at rows e_loc[j]; no-op for
        layers without an E cache."""
        j = self.index.get(layer)
        if j is not None:
            self.h[j].index_copy_(0, e_loc[j], hidden.to(self.h.dtype))

    def rows(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        return self.h[self.index[layer]].index_select(0, rows)

    @staticmethod
    def bytes_per_token(num_layers: int, hidden_size: int, dtype: torch.dtype) -> int:
        return num_layers * hidden_size * torch.empty((), dtype=dtype).element_size()


class SlotAllocator:
    """Reference-counted free lists over slots 1..size, one per index space (KV
    segment or E-cache layer). `allocate` hands out slots with one reference each,
    `share` adds a reference, `free` drops one; a slot whose count reaches zero is
    free again. Slot 0 (padding) is ignored by `share` and `free`."""

    def __init__(self, size: int, num_spaces: int = 1):
        self.size = size
        self.num_spaces = num_spaces
        self.refs = torch.zeros((num_spaces, size + 1), dtype=torch.int32)
        self._free = [torch.arange(1, size + 1, dtype=torch.int64) for _ in range(num_spaces)]
        self._released: list[list[torch.Tensor]] = [[] for _ in range(num_spaces)]
        self._count = [size] * num_spaces

    @property
    def available_size(self) -> int:
        """Tokens that can be allocated in every space."""
        return min(self._count)

    def can_allocate(self, n: int) -> bool:
        return n <= self.available_size

    def allocate(self, n: int, spaces: range | None = None) -> torch.Tensor:
        """[len(spaces), n] fresh slots (all spaces by default). The caller checks
        `can_allocate` first."""
        spaces = range(self.num_spaces) if spaces is None else spaces
        out = torch.empty((len(spaces), n), dtype=torch.int64)
        for i, g in enumerate(spaces):
            if n > self._free[g].numel() and self._released[g]:
                self._free[g] = torch.cat([self._free[g], *self._released[g]])
                self._released[g].clear()
            if n > self._free[g].numel():
                raise RuntimeError(f"KV pool exhausted: asked for {n}, {self._count[g]} free")
            out[i], self._free[g] = self._free[g][:n], self._free[g][n:]
            self.refs[g, out[i]] = 1
            self._count[g] -= n
        return out

    def share(self, slots: torch.Tensor, spaces: range | None = None) -> None:
        """Add a reference to each slot of `slots` ([len(spaces), n])."""
        spaces = range(self.num_spaces) if spaces is None else spaces
        for i, g in enumerate(spaces):
            s = slots[i][slots[i] > 0]
            if s.numel():
                self.refs[g].index_add_(0, s, torch.ones_like(s, dtype=torch.int32))

    def free(self, slots: torch.Tensor, spaces: range | None = None) -> None:
        """Drop a reference to each slot of `slots` ([len(spaces), n]). A slot may
        appear once per space per call."""
        spaces = range(self.num_spaces) if spaces is None else spaces
        for i, g in enumerate(spaces):
            s = slots[i][slots[i] > 0]
            if not s.numel():
                continue
            refs = self.refs[g]
            refs.index_add_(0, s, torch.full_like(s, -1, dtype=torch.int32))
            left = refs[s]
            assert int(left.min()) >= 0, "slot freed more often than it was referenced"
            released = s[left == 0]
            if released.numel():
                self._released[g].append(released)
                self._count[g] += int(released.numel())

    @property
    def num_referenced(self) -> int:
        """Slot references held in all spaces (0 when nothing holds KV)."""
        return int(self.refs.sum())

    def reset(self) -> None:
        self.__init__(self.size, self.num_spaces)


class ReqToTokenPool:
    """table[g, r, p]: the segment-g slot of token position p of the request in row r."""

    def __init__(self, max_requests: int, max_context_len: int, num_segments: int = 1,
                 device: str = "cpu"):
        self.max_requests = max_requests
        self.max_context_len = max_context_len
        self.table = torch.zeros((num_segments, max_requests, max_context_len), dtype=torch.int32,
                                 device=device)
        self._free_rows = list(range(max_requests))

    @property
    def available_size(self) -> int:
        return len(self._free_rows)

    def can_allocate(self) -> bool:
        return bool(self._free_rows)

    def allocate(self) -> int:
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def reset(self) -> None:
        self._free_rows = list(range(self.max_requests))
