"""Hot CPU ops: the C++ extension `droidspeak._C` when it is built, else the
pure-torch references in `reference.py` (logged once)."""
from __future__ import annotations

import importlib
import logging

import torch

from droidspeak.kernels import reference

logger = logging.getLogger(__name__)

try:
    _native = importlib.import_module("droidspeak._C")
except ImportError as exc:  # pragma: no cover - depends on the build
    _native = None
    _import_error = exc
else:
    _import_error = None

_warned = False


def native_available() -> bool:
    return _native is not None


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning("native extension droidspeak._C unavailable (%s); using the "
                       "pure-torch reference ops", _import_error)


def _supported(*tensors) -> bool:
    # `is_cpu` rather than `device.type`: called several times per layer, and
    # building a device object each time showed up in decode profiles
    return _native is not None and all(t.is_cpu for t in tensors)


def rope_and_store(q, k, v, positions, cos_sin_cache, k_cache, v_cache, out_loc) -> None:
    """See `reference.rope_and_store`."""
    if _supported(q, k_cache):
        _native.rope_and_store(q, k, v, positions, cos_sin_cache, k_cache, v_cache, out_loc)
    else:
        _warn_once()
        reference.rope_and_store(q, k, v, positions, cos_sin_cache, k_cache, v_cache, out_loc)


def extend_attention(q, k, v, positions, cos_sin_cache, k_cache, v_cache, out_loc, req_to_token,
                     req_pool_indices, prefix_lens, extend_lens, scale):
    """See `reference.extend_attention`."""
    if _supported(q, k_cache):
        return _native.extend_attention(q, k, v, positions, cos_sin_cache, k_cache, v_cache, out_loc,
                                        req_to_token, req_pool_indices, list(prefix_lens), list(extend_lens),
                                        float(scale))
    _warn_once()
    return reference.extend_attention(q, k, v, positions, cos_sin_cache, k_cache, v_cache, out_loc,
                                      req_to_token, req_pool_indices, prefix_lens, extend_lens, scale)


def decode_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    """See `reference.decode_attention`."""
    if _supported(q, k_cache):
        return _native.decode_attention(q, k_cache, v_cache, req_to_token,
                                        req_pool_indices, seq_lens, float(scale))
    _warn_once()
    return reference.decode_attention(q, k_cache, v_cache, req_to_token,
                                      req_pool_indices, seq_lens, scale)


def rans_encode(symbols, seg_lens, freqs, table_lens):
    """Native rANS (csrc/rans.cpp); callers check `native_available()` first."""
    return _native.rans_encode(symbols, seg_lens, freqs, table_lens)


def rans_decode(data, seg_lens, freqs, table_lens):
    return _native.rans_decode(data, seg_lens, freqs, table_lens)


def cachegen_dequantize(anchors, deltas, a_index, d_index, mean, anchor_step, delta_step, group, T):
    """The codec's lossy reconstruction (csrc/rans.cpp): (layer, channel) row r's
    symbols are row a_index[r] of `anchors` and d_index[r] of `deltas`;
    `codec._dequantize` is its numpy reference. Native only: the codec calls it
    where the extension is built."""
    return _native.cachegen_dequantize(anchors, deltas, a_index, d_index, mean, anchor_step, delta_step, group, T)


def codec_transform(x, mats, centre, first, forward):
    """A codec profile's transforms on the calling thread (csrc/codec_transform.cpp);
    `CodecProfile._apply_numpy` is its reference. Native only, as fp32_to_bf16."""
    return _native.codec_transform(x, mats, centre, first, forward)


def fp32_to_bf16(x):
    """fp32 -> bf16 on the calling thread (no OpenMP team); callers check
    `native_available()` first."""
    return _native.fp32_to_bf16(x)


# A group (one family member's rows) of at most this many rows runs its linear
# layers through the grouped kernel; beyond it oneDNN's blocked matmul is as fast
# or faster. Without AMX tiles the dot-product kernel wins only at decode's few
# rows (docs/kernels.md).
GROUPED_KERNEL_MAX_ROWS = 256 if _native is not None and _native.amx_available() else 32


def native_bf16(x: torch.Tensor) -> bool:
    """Whether the bf16-only native ops (grouped_linear, rmsnorm, silu_and_mul)
    run natively for `x`: the extension is built, and `x` is bf16 on the CPU."""
    return _supported(x) and x.dtype == torch.bfloat16


def layer_stack_available(x: torch.Tensor) -> bool:
    """Whether a bf16 forward's layers can run as one native call (`LayerStack`,
    csrc/layer_stack.cpp) for hidden states `x`."""
    return native_bf16(x) and hasattr(_native, "LayerStack")


def LayerStack(layers, segments, members, has_bias, num_heads, num_kv_heads, head_dim, eps):
    """A co-batched family's decoder layers in one native object; its `run` is the
    DecoderLayer sequence over a decode step or an extend (see csrc/ops.h).
    Callers check `layer_stack_available` first."""
    return _native.LayerStack(layers, segments, members, has_bias, num_heads, num_kv_heads, head_dim,
                              float(eps))


def LoRAStack(layers):
    """A LoRA adapter's per-layer (A, B) pairs (None, None where it has none) for
    qkv, o, gate_up and down, as one native object for `LayerStack.run`."""
    return _native.LoRAStack(layers)


def grouped_linear(x, weights, biases, rows):
    """See `reference.grouped_linear`; native for bf16 (csrc/grouped_linear.cpp)."""
    if native_bf16(x):
        return _native.grouped_linear(x, weights, biases, rows)
    return reference.grouped_linear(x, weights, biases, rows)


def rmsnorm(x, weight, row_group, eps):
    """See `reference.rmsnorm`; native for bf16."""
    if native_bf16(x):
        return _native.rmsnorm(x, weight, row_group, float(eps))
    return reference.rmsnorm(x, weight, row_group, eps)


def argmax_rows(x):
    """See `reference.argmax_rows`; native for float32 (several times faster than
    torch's max over the vocabulary)."""
    if _supported(x) and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0:
        return _native.argmax_rows(x if x.stride(1) == 1 else x.contiguous())
    return reference.argmax_rows(x)


def silu_and_mul(gate_up):
    """See `reference.silu_and_mul`; native for bf16."""
    if native_bf16(gate_up):
        return _native.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)
