"""Grouped-query self-attention over the paged token-slot KV pool."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from droidspeak import kernels
from droidspeak.layers.linear import grouped_linear

if TYPE_CHECKING:
    from droidspeak.runner.batch import ForwardBatch


class Attention(nn.Module):
    def __init__(self, layer_id: int, hidden_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, qkv_bias: bool):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv_proj = nn.Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: "ForwardBatch", cos_sin: torch.Tensor,
                mates: "list[Attention] | None" = None) -> torch.Tensor:
        """`mates[g]` is this attention in group g's member (default: this one
        alone): projections per member, attention once over every row."""
        mates = mates or [self]
        T = x.shape[0]
        qkv = grouped_linear([m.qkv_proj for m in mates], x, batch.groups)
        if batch.lora is not None:
            batch.lora.apply(qkv, x, self.layer_id, "qkv")
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = batch.kv_pool.layer(self.layer_id)
        segment = batch.kv_pool.segments.segment_of[self.layer_id]
        table = batch.req_to_token[segment]
        if batch.is_decode:
            kernels.rope_and_store(q, k, v, batch.positions, cos_sin, k_cache, v_cache,
                                   batch.out_cache_loc[segment])
            out = kernels.decode_attention(q, k_cache, v_cache, table,
                                           batch.req_pool_indices, batch.seq_lens, self.scale)
        else:
            out = kernels.extend_attention(q, k, v, batch.positions, cos_sin, k_cache, v_cache,
                                           batch.out_cache_loc[segment], table, batch.req_pool_indices,
                                           batch.prefix_lens, batch.extend_lens, self.scale)
        out = out.reshape(T, self.q_size)
        o = grouped_linear([m.o_proj for m in mates], out, batch.groups)
        if batch.lora is not None:
            batch.lora.apply(o, out, self.layer_id, "o")
        return o
