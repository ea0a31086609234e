"""Causal GQA attention over the paged KV cache, HF order: q/k RMSNorm per head, NeoX RoPE, softmax(QK^T/sqrt(D))V.

`attention_builtin` is MAX's own CPU path: fused qkv matmul writing K/V into the paged cache,
K norm in place in the cache, fused q/k RoPE, flash_attention_ragged.
"""

from __future__ import annotations

from max.graph import TensorValue, ops
from max.nn.attention import MHAMaskVariant
from max.nn.kernels import flash_attention_ragged, fused_qk_ragged_rope, fused_qkv_ragged_matmul, rms_norm_key_cache
from max.nn.kv_cache import MHAKVCacheParams


def attention_builtin(kv_params: MHAKVCacheParams, x: TensorValue, row_offsets: TensorValue, kv, layer_idx: TensorValue,
                      wqkv: TensorValue, q_norm: TensorValue, k_norm: TensorValue, freqs_cis: TensorValue,
                      n_heads: int, eps: float) -> TensorValue:
    """x [T, H] -> attention output [T, n_heads * D] (before o_proj); writes this step's K/V into the cache."""
    T, D = x.shape[0], kv_params.head_dim
    q = fused_qkv_ragged_matmul(kv_params, input=x, input_row_offsets=row_offsets, wqkv=wqkv,
                                kv_collection=kv, layer_idx=layer_idx, n_heads=n_heads)  # [T, Hq*D]
    q = ops.rms_norm(ops.reshape(q, [T, n_heads, D]), q_norm, eps)  # [T, Hq, D]
    rms_norm_key_cache(kv_params, kv_collection=kv, gamma=k_norm, epsilon=eps, layer_idx=layer_idx,
                       total_seq_len=T, input_row_offsets=row_offsets, weight_offset=0.0,
                       multiply_before_cast=False, per_head_norm=True)
    q = fused_qk_ragged_rope(kv_params, q, row_offsets, kv, freqs_cis, layer_idx, interleaved=False)
    o = flash_attention_ragged(kv_params, input=q, kv_collection=kv, layer_idx=layer_idx, input_row_offsets=row_offsets,
                               mask_variant=MHAMaskVariant.CAUSAL_MASK, scale=D ** -0.5)  # [T, Hq, D]
    return ops.reshape(o, [T, n_heads * D])
