"""Llama-family decoder (SmolLM2, Llama 3.x, Qwen2/2.5) written for the slot pool.

`forward_layers(hidden, batch, start, end)` runs any span of layers from given
hidden states, which is what cross-model reuse needs: it recomputes layers s..e of
a receiver over a sender's stored hidden states.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from droidspeak import kernels
from droidspeak.layers.attention import Attention
from droidspeak.layers.linear import grouped_linear
from droidspeak.layers.mlp import SwiGLU
from droidspeak.layers.norm import RMSNorm
from droidspeak.layers.rotary import cos_sin_cache
from droidspeak.models.config import ModelConfig

if TYPE_CHECKING:
    from droidspeak.runner.batch import ForwardBatch, RowGroups


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(layer_id, config.hidden_size, config.num_heads,
                                   config.num_kv_heads, config.head_dim, config.qkv_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(layer_id, config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor, batch: "ForwardBatch", cos_sin: torch.Tensor,
                mates: "list[DecoderLayer] | None" = None) -> torch.Tensor:
        """`mates[g]` is this layer in `batch.groups`' member g (default: this one
        alone, for every row)."""
        mates = mates or [self]
        x = self.input_layernorm(hidden, batch.groups, [m.input_layernorm for m in mates])
        hidden = hidden + self.self_attn(x, batch, cos_sin, [m.self_attn for m in mates])
        x = self.post_attention_layernorm(hidden, batch.groups, [m.post_attention_layernorm for m in mates])
        return hidden + self.mlp(x, batch, [m.mlp for m in mates])


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)
        self._layer_stacks: dict[tuple[int, ...], object] = {}

    def init_rope(self, max_positions: int) -> None:
        c = self.config
        self.cos_sin = cos_sin_cache(c.head_dim, max_positions, c.rope_theta, c.rope_scaling)

    def embed(self, input_ids: torch.Tensor, groups: "RowGroups | None" = None,
              members: "list[LlamaForCausalLM] | None" = None) -> torch.Tensor:
        """Token embeddings; with `groups`, each row from its own member's table."""
        if members is None or len(members) == 1:
            return self.embed_tokens(input_ids)
        hidden = self.embed_tokens.weight.new_empty(input_ids.shape[0], self.config.hidden_size)
        for member, rows in zip(members, groups.rows):
            hidden[rows] = member.embed_tokens(input_ids.index_select(0, rows))
        return hidden

    def forward_layers(self, hidden: torch.Tensor, batch: "ForwardBatch", start: int, end: int,
                       members: "list[LlamaForCausalLM] | None" = None) -> torch.Tensor:
        """Run layers [start, end) over `hidden`, the residual stream entering
        layer `start`; writes those layers' KV to the pool at `batch.out_cache_loc`
        and, where `batch.e_loc` asks for it, the stream entering each E-cache
        layer to `batch.e_pool`. `members[g]` runs the rows of `batch.groups`'
        group g (default: this model runs every row)."""
        members = members or [self]
        if self._native_layers(hidden, batch):
            decode = batch.is_decode
            loras, lora_rows = batch.lora.native(len(self.layers)) if batch.lora is not None else ([], [])
            return self._layer_stack(members, batch.kv_pool).run(
                hidden, start, end, batch.groups.rows if batch.groups else [],
                batch.groups.native if batch.groups else [],
                batch.groups.row_group if len(members) > 1 else None, batch.positions, self.cos_sin,
                batch.kv_pool.k, batch.kv_pool.v, batch.out_cache_loc, batch.req_to_token,
                batch.req_pool_indices, batch.seq_lens, [] if decode else batch.prefix_lens,
                [] if decode else batch.extend_lens, decode, self.layers[0].self_attn.scale, loras, lora_rows,
                kernels.GROUPED_KERNEL_MAX_ROWS, *self._e_cache_args(batch))
        for i in range(start, end):
            for load in batch.loads:  # prefix KV streaming in from the KV store: wait for this layer's
                load.ensure(i)
            if batch.e_loc is not None:
                batch.e_pool.store(i, batch.e_loc, hidden)
            hidden = self.layers[i](hidden, batch, self.cos_sin, [m.layers[i] for m in members])
        return hidden

    @staticmethod
    def _native_layers(hidden: torch.Tensor, batch: "ForwardBatch") -> bool:
        """Whether a span runs as one native call (`kernels.LayerStack`, LoRA
        deltas and the E cache included): a bf16 forward with no KV-store loads
        to wait for between layers."""
        return not batch.loads and kernels.layer_stack_available(hidden)

    def _e_cache_args(self, batch: "ForwardBatch") -> tuple:
        """(cache tensor, index per layer or -1, rows) for the stack's E-cache store."""
        if batch.e_loc is None:
            return None, [], None
        pool = batch.e_pool
        return pool.h, [pool.index.get(i, -1) for i in range(len(self.layers))], batch.e_loc

    def _layer_stack(self, members: "list[LlamaForCausalLM]", kv_pool) -> object:
        """The native stack of `members`' layers (built once per member list)."""
        key = tuple(id(m) for m in members) + (id(kv_pool),)
        stack = self._layer_stacks.get(key)
        if stack is None:
            layers = []
            for i in range(len(self.layers)):
                mates = [m.layers[i] for m in members]
                norms = [torch.stack([getattr(m, n).weight for m in mates]) if len(mates) > 1
                         else getattr(mates[0], n).weight
                         for n in ("input_layernorm", "post_attention_layernorm")]
                linears = [m.self_attn.qkv_proj.weight for m in mates]
                linears += [m.self_attn.o_proj.weight for m in mates]
                linears += [m.mlp.gate_up_proj.weight for m in mates]
                linears += [m.mlp.down_proj.weight for m in mates]
                if self.config.qkv_bias:
                    linears += [m.self_attn.qkv_proj.bias for m in mates]
                layers.append(norms + linears)
            c = self.config
            stack = kernels.LayerStack(layers, list(kv_pool.segments.segment_of), len(members), c.qkv_bias,
                                        c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps)
            self._layer_stacks[key] = stack
        return stack

    def forward(self, batch: "ForwardBatch", members: "list[LlamaForCausalLM] | None" = None) -> torch.Tensor:
        """All layers; returns the final residual stream [T, hidden] (not normed)."""
        hidden = self.embed(batch.input_ids, batch.groups, members)
        return self.forward_layers(hidden, batch, 0, len(self.layers), members)

    def lm_head_linear(self) -> nn.Module:
        return self.embed_tokens if self.config.tie_word_embeddings else self.lm_head

    def logits(self, hidden: torch.Tensor, groups: "RowGroups | None" = None,
               members: "list[LlamaForCausalLM] | None" = None) -> torch.Tensor:
        """Final norm + LM head on selected rows of the residual stream; fp32
        logits. With `groups` (over these rows), each row through its member's."""
        members = members or [self]
        x = self.norm(hidden, groups, [m.norm for m in members])
        return grouped_linear([m.lm_head_linear() for m in members], x, groups).float()
