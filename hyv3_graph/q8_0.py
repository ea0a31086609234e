"""llama.cpp's Q8_0 weight format: blocks of 32 int8 weights along K, each led by its float16 scale.

A weight W [N, K] (K a multiple of 32) is stored as uint8 [N, K / 32 * 34]: row n holds its K / 32 blocks in
order, and block b of it is the scale d (float16, little endian, 2 bytes) followed by q[0..32) (int8), with
W[n, 32 b + i] = d * q[i]. This is GGML_TYPE_Q8_0 byte for byte (`block_q8_0` in ggml-common.h), so a tensor read
from a Q8_0 GGUF is used as it is and ours can be written to one. In float32, d * q is exact (11 + 8 significant
bits), so the ops' float32 dequantized weights are exactly the values of `dequantize`.

`quantize` reproduces ggml's reference quantizer (`quantize_row_q8_0_ref`, and the `gguf` package's numpy copy of
it) bit for bit: d = max |w| / 127 in float32, q = round-half-away(w / d) computed as w * (1 / d), d stored
rounded to float16; an all-zero block gets d = 0 and q = 0. tests/test_q8_0.py checks it against `gguf`.
Ops that take Q8_0 weights: kernels/linear.mojo (`linear_q8_0`, `linear_swiglu_q8_0`) and kernels/moe_experts.mojo.

In a `--dtype q8_0` model (`is_quantized` below) every matmul weight is Q8_0: the attention projections, the dense
MLP, the shared and routed experts and lm_head. The embedding, the norms, the router and its correction bias stay
float32 (a lower-precision router changes which experts win), and so do the activations and the KV cache.
"""

from __future__ import annotations

import numpy as np

from .dtypes import bf16_bits_to_f32

BLOCK = 32  # weights per block (QK8_0)
BLOCK_BYTES = 2 + BLOCK  # the float16 scale, then 32 int8


def check_k(K: int, what: str = "Q8_0") -> None:
    """Q8_0 blocks run along K: a K that is no multiple of 32 is refused rather than padded (a padded row could not
    be written to a GGUF that llama.cpp reads, and every Hy3 dimension is a multiple of 32)."""
    if K % BLOCK:
        raise ValueError(f"{what}: the reduced dimension K = {K} is not a multiple of {BLOCK} (Q8_0 blocks)")


def row_bytes(K: int) -> int:
    """Bytes of one Q8_0 row of K weights."""
    check_k(K)
    return K // BLOCK * BLOCK_BYTES


def k_of(row_nbytes: int) -> int:
    """K of a Q8_0 row of row_nbytes bytes."""
    if row_nbytes % BLOCK_BYTES:
        raise ValueError(f"Q8_0: a row of {row_nbytes} bytes is not a whole number of {BLOCK_BYTES}-byte blocks")
    return row_nbytes // BLOCK_BYTES * BLOCK


_CHUNK_BLOCKS = 1 << 20  # blocks quantized at a time: the float32 temporaries stay ~128 MB for any tensor


def is_quantized(name: str) -> bool:
    """Whether the weight of this name (our names, hyv3_graph/weights.py) is Q8_0 in a q8_0 model."""
    return name == "lm_head.weight" or name.endswith(("_proj.weight", "mlp.experts.gate_up", "mlp.experts.down"))


def quantize(w: np.ndarray) -> np.ndarray:
    """w [..., K] (float32, float16, or bf16 bits as uint16, as the checkpoint reader gives them; a mapped view is
    read in chunks, never widened whole) -> uint8 [..., K / 32 * 34]."""
    w = np.asarray(w)
    *lead, K = w.shape
    check_k(K)
    flat = w.reshape(-1, BLOCK)  # [n_blocks, 32]
    out = np.empty((flat.shape[0], BLOCK_BYTES), np.uint8)
    for b0 in range(0, flat.shape[0], _CHUNK_BLOCKS):
        chunk = flat[b0:b0 + _CHUNK_BLOCKS]
        out[b0:b0 + _CHUNK_BLOCKS] = _quantize_blocks(bf16_bits_to_f32(chunk) if chunk.dtype == np.uint16
                                                      else chunk.astype(np.float32))
    return out.reshape(*lead, K // BLOCK * BLOCK_BYTES)


def _quantize_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [n, 32] -> uint8 [n, 34]: ggml's quantize_row_q8_0_ref."""
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # [n_blocks, 1] float32
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    scaled = blocks * inv  # float32, |scaled| <= 127 (up to the rounding of 1 / d)
    a = np.abs(scaled)
    q = np.sign(scaled) * (np.floor(a) + np.floor(2 * (a - np.floor(a))))  # C's roundf, exactly: no a + 0.5 rounding
    out = np.empty((blocks.shape[0], BLOCK_BYTES), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q.astype(np.int8).view(np.uint8)
    return out


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """The int8 activations of the ops' vpdpbusd paths (kernels/microkernels.mojo::q8_quantize_activations), as the
    float64 values they stand for: x [..., K] (float32 values; K a multiple of 32) in blocks of 32 along K, each
    d = max |x| / 127 and q = round-half-even(x * (1 / d)) clipped to [-127, 127], in float32 arithmetic, like
    llama.cpp's Q8_0 activations but with a float32 d; returns q * d [..., K] in float64 (exact)."""
    x = np.asarray(x, np.float32)
    *lead, K = x.shape
    check_k(K, "Q8_0 activations")
    blocks = x.reshape(-1, BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True, initial=np.float32(0)) / np.float32(127)  # float32
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.clip(np.rint(blocks * inv), -127, 127)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(*lead, K)


def dequantize(q: np.ndarray) -> np.ndarray:
    """uint8 [..., K / 32 * 34] -> float32 [..., K], exactly the values the ops compute with."""
    q = np.asarray(q, np.uint8)
    *lead, nbytes = q.shape
    K = k_of(nbytes)
    blocks = q.reshape(-1, BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1]
    return (blocks[:, 2:].view(np.int8).astype(np.float32) * d).reshape(*lead, K)
