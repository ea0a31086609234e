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

from ..dtypes import bf16_rounded


def token_positions(row_offsets, cache_lengths) -> np.ndarray:
    """[T] position of every new token: its sequence's cache length plus its index among the new tokens."""
    return np.concatenate([int(c) + np.arange(int(row_offsets[b + 1]) - int(row_offsets[b]))
                           for b, c in enumerate(cache_lengths)] + [np.zeros(0, np.int64)]).astype(np.int64)


def rotated_reference(x, gamma, freqs_cis, positions, eps) -> np.ndarray:
    """float64 RMSNorm(x) * gamma, then NeoX RoPE (rotate halves): x [T, heads, D] at positions [T]."""
    x = np.asarray(x, np.float64)
    freqs = np.asarray(freqs_cis, np.float64)[positions]  # [T, D]: (cos, sin) interleaved
    cos, sin = freqs[:, None, 0::2], freqs[:, None, 1::2]  # [T, 1, D/2]
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(gamma, np.float64)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


# The op's work split (kernels/attention.mojo: ROWS, NR): a query tile holds max(1, ROWS // G) queries; a tile of
# at most NR rows (queries x G heads) is a narrow item, which on a bf16 cache with AVX512_BF16 computes on bf16
# pairs (Q and P rounded to bf16) when D is a multiple of 32.
OP_ROWS, OP_NR = 64, 8


def narrow_queries(row_offsets, G: int) -> np.ndarray:
    """[T] bool: the new tokens whose query tile the op runs as a narrow item."""
    qt = max(1, OP_ROWS // G)
    out = []
    for b in range(len(row_offsets) - 1):
        n = int(row_offsets[b + 1]) - int(row_offsets[b])
        out += [min(qt, n - q0) * G <= OP_NR for q0 in range(0, n, qt) for _ in range(min(qt, n - q0))]
    return np.array(out, bool)


def _bf16(x) -> np.ndarray:
    """float64 values rounded as float32 -> bf16 (round to nearest even), as the op rounds."""
    return bf16_rounded(np.asarray(x, np.float32)).astype(np.float64)


def attention_reference(qkv, q_norm, k_norm, freqs_cis, row_offsets, history, n_kv_heads, eps, scale=None,
                        bf16_rounding: np.ndarray | None = None):
    """float64 spec over the full concatenated history of each sequence.

    qkv [T, (Hq + 2 Hkv) D]; history[b] = (K, V), each [cache_len_b, Hkv, D]: what the cache holds (K already
    normed and rotated). freqs_cis [P, D]: (cos, sin) interleaved per frequency.
    Returns (out [T, Hq, D], new_k [T, Hkv, D], new_v [T, Hkv, D]): new_k/new_v are what the op must store.

    bf16_rounding (a bfloat16 cache): None = exact; else [T] bool, the queries computed on bf16 pairs. Then the
    reference rounds where the op does: the new K as stored in the cache, the output, and for the flagged
    queries the scaled Q and the softmax's probabilities (against the row's global max; the op rounds against
    its running max, the same relative step).
    """
    qkv = np.asarray(qkv, np.float64)
    D, Hkv = np.asarray(q_norm).shape[0], n_kv_heads
    T, Hq = qkv.shape[0], qkv.shape[1] // D - 2 * Hkv
    G, scale = Hq // Hkv, D ** -0.5 if scale is None else scale
    pos = token_positions(row_offsets, [len(k) for k, _ in history])
    q = rotated_reference(qkv[:, : Hq * D].reshape(T, Hq, D), q_norm, freqs_cis, pos, eps) * scale
    new_k = rotated_reference(qkv[:, Hq * D: (Hq + Hkv) * D].reshape(T, Hkv, D), k_norm, freqs_cis, pos, eps)
    new_v = qkv[:, (Hq + Hkv) * D:].reshape(T, Hkv, D)
    rounding = bf16_rounding is not None
    if rounding and np.any(bf16_rounding):
        q[bf16_rounding] = _bf16(q[bf16_rounding])
    stored_k = _bf16(new_k) if rounding else new_k
    out = np.zeros((T, Hq, D))
    for b, (k_hist, v_hist) in enumerate(history):
        t0, t1 = int(row_offsets[b]), int(row_offsets[b + 1])
        keys = np.concatenate([np.asarray(k_hist, np.float64), stored_k[t0:t1]])  # [c + n, Hkv, D]
        values = np.concatenate([np.asarray(v_hist, np.float64), new_v[t0:t1]])
        for h in range(Hq):
            s = q[t0:t1, h] @ keys[:, h // G].T  # [n, c + n]
            s[np.arange(len(keys))[None, :] > pos[t0:t1, None]] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True, initial=-np.inf))
            if rounding:
                flagged = bf16_rounding[t0:t1]
                p[flagged] = _bf16(p[flagged])
            out[t0:t1, h] = (p / p.sum(axis=1, keepdims=True)) @ values[:, h // G]
    return (_bf16(out) if rounding else out), new_k, new_v


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
                               mask_variant=MHAMaskVariant.CAUSAL_MASK, scale=D ** -0.5)  # [T, Hq, D]
    return ops.reshape(o, [T, n_heads * D])
