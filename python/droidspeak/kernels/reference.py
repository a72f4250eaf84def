"""Pure-torch reference implementations of the native ops in `csrc/`.

They define the semantics the C++ kernels must match, and they are what the
engine runs when the extension is not built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor,
                   out_loc: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (rotate-half RoPE), then
    write k and v into the layer's pool rows `out_loc` [T].

    `cos_sin_cache` is [max_pos, D] float32: cos in the first half, sin in the second.
    """
    half = q.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions).to(q.dtype)
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (q, k):
        x1, x2 = x[..., :half], x[..., half:]
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        x[..., :half] = r1
        x[..., half:] = r2
    k_cache[out_loc] = k
    v_cache[out_loc] = v


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per request. q [B, Hq, D]; K/V are read from the pool
    through `req_to_token[req_pool_indices[b], :seq_lens[b]]`. Returns [B, Hq, D]."""
    out = torch.empty_like(q)
    num_heads, num_kv = q.shape[1], k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        slots = req_to_token[req_pool_indices[b], :n].long()
        k = k_cache.index_select(0, slots).transpose(0, 1)  # [Hkv, n, D]
        v = v_cache.index_select(0, slots).transpose(0, 1)
        qb = q[b].unsqueeze(1)  # [Hq, 1, D]
        out[b] = F.scaled_dot_product_attention(
            qb, k, v, scale=scale, enable_gqa=num_heads != num_kv).squeeze(1)
    return out


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     out_loc: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     prefix_lens: list[int], extend_lens: list[int], scale: float) -> torch.Tensor:
    """Prefill attention of a ragged batch over the slot pool, after RoPE and the KV
    store (`rope_and_store`). Request b's queries are rows [sum(extend_lens[:b]),
    + extend_lens[b]) at positions prefix_lens[b] + j; query j sees keys 0 ..
    prefix_lens[b] + j of its sequence, read through
    `req_to_token[req_pool_indices[b]]` [context] int32. Returns [T, Hq, D]."""
    rope_and_store(q, k, v, positions, cos_sin_cache, k_cache, v_cache, out_loc)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    start = 0
    for b, (p, n) in enumerate(zip(prefix_lens, extend_lens)):
        if p == 0:
            ki, vi, mask = k[start:start + n], v[start:start + n], None
        else:
            slots = req_to_token[req_pool_indices[b], :p + n].long()
            ki, vi = k_cache.index_select(0, slots), v_cache.index_select(0, slots)
            mask = torch.arange(p + n)[None, :] <= (p + torch.arange(n))[:, None]
        oi = F.scaled_dot_product_attention(
            q[None, start:start + n].transpose(1, 2), ki[None].transpose(1, 2), vi[None].transpose(1, 2),
            attn_mask=mask, is_causal=p == 0, scale=scale, enable_gqa=gqa)
        out[start:start + n] = oi[0].transpose(0, 1)
        start += n
    return out


def grouped_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                   rows: list[torch.Tensor]) -> torch.Tensor:
    """out[rows[g]] = x[rows[g]] @ weights[g]^T (+ biases[g]) for each group g: the
    linear layers of several family members over their own rows of one batch.
    Every row of `x` belongs to exactly one group."""
    out = x.new_empty(x.shape[0], weights[0].shape[0])
    for w, b, r in zip(weights, biases, rows):
        out[r] = torch.nn.functional.linear(x.index_select(0, r), w, b)
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, row_group: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Llama RMSNorm as transformers computes it (normalise in fp32, round to the
    input dtype, scale); with `row_group`, `weight` is [G, H] and row t is scaled
    by weight[row_group[t]]."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if row_group is not None:
        weight = weight.index_select(0, row_group)
    return weight * y


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation over the fused projection: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's first maximum of [B, V] (a NaN counts as the maximum)."""
    return x.max(-1).indices
