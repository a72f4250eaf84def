"""KV memory: a token-slot pool per layer, the slot allocator, and the
request-to-token table (SGLang's token_to_kv_pool / req_to_token_pool)."""
from __future__ import annotations

import torch


class KVPool:
    """K and V for `size` token slots in every layer: [num_layers, size + 1, H_kv, D].

    Slot 0 is a padding slot that is never handed out, so a zeroed index is always
    safe to read.
    """

    def __init__(self, size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str = "cpu"):
        self.size = size
        self.num_layers = num_layers
        self.dtype = dtype
        shape = (num_layers, size + 1, num_kv_heads, head_dim)
        # torch.empty leaves pages untouched until used, so a large budget costs
        # resident memory only as it fills.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, 0].zero_()
        self.v[:, 0].zero_()

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer_id], self.v[layer_id]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class SlotAllocator:
    """Free list over pool slots 1..size. `can_allocate`/`allocate`, `free`."""

    def __init__(self, size: int):
        self.size = size
        self._free = torch.arange(1, size + 1, dtype=torch.int64)
        self._released: list[torch.Tensor] = []

    @property
    def available_size(self) -> int:
        return int(self._free.numel()) + sum(int(t.numel()) for t in self._released)

    def can_allocate(self, n: int) -> bool:
        return n <= self.available_size

    def allocate(self, n: int) -> torch.Tensor:
        """Return `n` free slots (int64). The caller checks `can_allocate` first."""
        if n > self._free.numel() and self._released:
            self._free = torch.cat([self._free, *self._released])
            self._released.clear()
        if n > self._free.numel():
            raise RuntimeError(f"KV pool exhausted: asked for {n}, {self._free.numel()} free")
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._released.append(slots.to(torch.int64).clone())

    def reset(self) -> None:
        self.__init__(self.size)


class ReqToTokenPool:
    """Row r maps the token positions of the request holding row r to pool slots."""

    def __init__(self, max_requests: int, max_context_len: int, device: str = "cpu"):
        self.max_requests = max_requests
        self.max_context_len = max_context_len
        self.table = torch.zeros((max_requests, max_context_len), dtype=torch.int32, device=device)
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
