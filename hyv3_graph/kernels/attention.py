"""Causal GQA attention over the paged KV cache, HF order: q/k RMSNorm per head, NeoX RoPE, softmax(QK^T/sqrt(D))V.

Our Mojo op: `kernels/attention.mojo` (its header says what is fused and why): it takes the raw QKV projection
and does norms, RoPE, the in-place K/V store and flash attention in one call.
`attention_builtin` is MAX's own CPU path, the peer: fused qkv matmul writing K/V into the paged cache,
K norm in place in the cache, fused q/k RoPE, flash_attention_ragged.
`attention_reference` is the float64 numpy spec. Fuzz test: tests/test_attention.py; bench: bench/cases/attention.py.
"""

from __future__ import annotations

import numpy as np
from max.graph import DeviceRef, TensorType, TensorValue, ops
from max.nn.attention import MHAMaskVariant
from max.nn.kernels import flash_attention_ragged, fused_qk_ragged_rope, fused_qkv_ragged_matmul, rms_norm_key_cache
from max.nn.kv_cache import MHAKVCacheParams


def _norm_rope_reference(x, gamma, cos, sin, eps):
    """x [..., D] float64 -> RMSNorm(x) * gamma, then NeoX RoPE (rotate halves) with cos/sin [..., D/2]."""
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gamma
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def attention_reference(qkv, q_norm, k_norm, freqs_cis, row_offsets, history, n_kv_heads, eps, scale=None):
    """float64 spec over the full concatenated history of each sequence.

    qkv [T, (Hq + 2 Hkv) D]; history[b] = (K, V), each [cache_len_b, Hkv, D]: what the cache holds (K already
    normed and rotated). freqs_cis [P, D]: (cos, sin) interleaved per frequency.
    Returns (out [T, Hq, D], new_k [T, Hkv, D], new_v [T, Hkv, D]): new_k/new_v are what the op must store.
    """
    qkv = np.asarray(qkv, np.float64)
    D = np.asarray(q_norm).shape[0]
    Hkv = n_kv_heads
    T, Hq = qkv.shape[0], qkv.shape[1] // D - 2 * Hkv
    G, scale = Hq // Hkv, D ** -0.5 if scale is None else scale
    freqs = np.asarray(freqs_cis, np.float64)
    out = np.zeros((T, Hq, D))
    new_k, new_v = np.zeros((T, Hkv, D)), qkv[:, (Hq + Hkv) * D:].reshape(T, Hkv, D).copy()
    for b, (k_hist, v_hist) in enumerate(history):
        t0, t1 = int(row_offsets[b]), int(row_offsets[b + 1])
        c, n = len(k_hist), t1 - t0
        if n == 0:
            continue
        pos = c + np.arange(n)
        cos, sin = freqs[pos, 0::2][:, None, :], freqs[pos, 1::2][:, None, :]  # [n, 1, D/2]
        q = _norm_rope_reference(qkv[t0:t1, : Hq * D].reshape(n, Hq, D), np.asarray(q_norm, np.float64), cos, sin, eps)
        k = _norm_rope_reference(qkv[t0:t1, Hq * D: (Hq + Hkv) * D].reshape(n, Hkv, D),
                                 np.asarray(k_norm, np.float64), cos, sin, eps)
        new_k[t0:t1] = k
        keys = np.concatenate([np.asarray(k_hist, np.float64), k])  # [c + n, Hkv, D]
        values = np.concatenate([np.asarray(v_hist, np.float64), new_v[t0:t1]])
        for h in range(Hq):
            s = q[:, h] @ keys[:, h // G].T * scale  # [n, c + n]
            s[np.arange(c + n)[None, :] > pos[:, None]] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[t0:t1, h] = (p / p.sum(axis=1, keepdims=True)) @ values[:, h // G]
    return out, new_k, new_v


def attention(qkv: TensorValue, q_norm: TensorValue, k_norm: TensorValue, freqs_cis: TensorValue,
              row_offsets: TensorValue, kv_blocks, cache_lengths: TensorValue, lookup_table: TensorValue,
              layer_idx: TensorValue, eps: float, scale: float | None = None) -> TensorValue:
    """Our op: qkv [T, (Hq + 2 Hkv) D] -> [T, Hq, D]; writes this step's normed, rotated K and V into kv_blocks.

    The cache pieces are MAX's (`PagedCacheValues` fields); every dim may be symbolic. freqs_cis stays
    float32 [P, D]; qkv, the norms and the cache share the model dtype. scale None: 1/sqrt(D), at run time."""
    cpu = DeviceRef.CPU()
    D, Hkv = kv_blocks.shape[5], kv_blocks.shape[4]
    n_heads = qkv.shape[1] // D - 2 * Hkv
    return ops.inplace_custom(
        "attention", device=cpu,
        values=[kv_blocks, qkv, q_norm, k_norm, freqs_cis, row_offsets, cache_lengths, lookup_table,
                ops.reshape(layer_idx, [1])],
        out_types=[TensorType(qkv.dtype, [qkv.shape[0], n_heads, D], device=cpu)],
        parameters={"eps": float(eps), "scale": 0.0 if scale is None else float(scale)})[0].tensor


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
                               mask_variant=MHAMaskVariant.CAUSAL_MASK,
                               scale=D ** -0.5)  # [T, Hq, D]
    return ops.reshape(o, [T, n_heads * D])
