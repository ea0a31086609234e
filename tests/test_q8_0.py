"""hyv3_graph/q8_0.py: our Q8_0 quantizer is llama.cpp's reference quantizer bit for bit (the `gguf` package's
numpy port of ggml's `quantize_row_q8_0_ref` is the oracle), and `dequantize` gives d * q exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from hyv3_graph import q8_0
from hyv3_graph.dtypes import bf16_rounded

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

# Blocks that probe the quantizer's corners: all zero, one nonzero, exact halves after scaling (roundf vs
# round-half-even), the largest magnitude at the end or negative, a scale that underflows float16, and huge values.
# (Denormal blocks are left out: 1 / d overflows to inf there, and the C reference then casts inf to int8: UB.)
_EDGE_BLOCKS = [
    np.zeros(32, np.float32),
    np.eye(1, 32, 5, dtype=np.float32)[0] * -3.0,
    np.arange(-16, 16, dtype=np.float32) * 0.5 + 0.25,
    np.concatenate([np.full(31, 0.5, np.float32), [127.0]]).astype(np.float32),
    np.concatenate([np.linspace(-1, 1, 31, dtype=np.float32), [-2.5]]).astype(np.float32),
    np.full(32, 1e-30, np.float32),
    np.full(32, 6.0e4, np.float32) * np.where(np.arange(32) % 2, 1, -1).astype(np.float32),
]


def _oracle(w: np.ndarray) -> np.ndarray:
    return gguf_quants.quantize(np.asarray(w, np.float32), GGMLQuantizationType.Q8_0)


@given(st.integers(1, 6), st.integers(1, 8), st.sampled_from([1e-3, 1.0, 300.0]), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_quantize_matches_llama_cpp_reference(rows, blocks, scale, bf16, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, 32 * blocks)) * scale).astype(np.float32)
    if bf16:  # the real checkpoint's weights are bf16 values
        w = bf16_rounded(w)
    q = q8_0.quantize(w)
    assert q.dtype == np.uint8 and q.shape == (rows, q8_0.row_bytes(32 * blocks))
    assert np.array_equal(q, _oracle(w))


def test_edge_blocks_match_llama_cpp_reference():
    w = np.stack(_EDGE_BLOCKS)
    assert np.array_equal(q8_0.quantize(w), _oracle(w))


def test_dequantize_is_scale_times_int8():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 96)).astype(np.float32)
    q = q8_0.quantize(w)
    assert q.shape == (3, 2, 3 * q8_0.BLOCK_BYTES)
    deq = q8_0.dequantize(q)
    blocks = q.reshape(-1, q8_0.BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float64)
    ints = blocks[:, 2:].view(np.int8).astype(np.float64)
    assert np.array_equal(deq.reshape(-1, 32).astype(np.float64), ints * d)  # float32 holds d * q exactly
    oracle = gguf_quants.dequantize(blocks, GGMLQuantizationType.Q8_0)
    assert np.array_equal(deq.reshape(-1, 32), oracle.reshape(-1, 32))
    # each weight within half a step (d / 2) plus the float16 rounding of d (|q| <= 127)
    dmax = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(deq.reshape(-1, 32) - w.reshape(-1, 32)) <= dmax * (0.5 + 127 * 2.0**-11) + 1e-12)


@pytest.mark.parametrize("K", [1, 31, 33, 100])
def test_k_not_a_multiple_of_32_is_refused(K):
    with pytest.raises(ValueError, match="not a multiple of 32"):
        q8_0.quantize(np.ones((2, K), np.float32))
    with pytest.raises(ValueError, match="34-byte blocks"):
        q8_0.dequantize(np.zeros((2, K), np.uint8))


def test_activations_within_half_a_step():
    """quantize_activations (the vpdpbusd paths' int8 x, float32 scales): each value within half a step of x, the
    block's largest magnitude exact (q = +-127), zero blocks zero; the kernels match it exactly (tests/test_linear.py,
    tests/test_moe_experts.py)."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal((4, 96)).astype(np.float32) * 3, np.stack(_EDGE_BLOCKS[:6]).reshape(2, 96)])
    xd = q8_0.quantize_activations(x)
    d = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True).astype(np.float64) / 127
    assert xd.shape == x.shape and xd.dtype == np.float64
    assert np.all(np.abs(xd.reshape(-1, 32) - x.reshape(-1, 32)) <= d * (0.5 + 1e-6))
    steps = xd.reshape(-1, 32) / np.where(d == 0, 1, d)
    assert np.allclose(steps, np.rint(steps), rtol=1e-6, atol=0) and np.abs(steps).max() <= 127 * (1 + 1e-6)
    assert np.all(xd[x == 0] == 0)
