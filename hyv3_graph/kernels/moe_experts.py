"""Routed MoE experts: out[t] = sum over t's k experts of weight * down(silu(gate(x_t)) * up(x_t)).

Our Mojo op: `kernels/moe_experts.mojo` (its header explains the paths and the combine order).
Here: its graph wrapper, the MAX built-in peer (`experts_builtin`), and the float64 numpy reference.
Fuzz test: tests/test_moe_experts.py; bench: bench/cases/moe_experts.py.
"""

from __future__ import annotations

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, TensorType, TensorValue, ops

from .. import q8_0
from ..dtypes import bf16_rounded
from .cpu_isa import AMX_K_STEP, amx_available, bf16_dot_available, vnni_available


SMALL_ROWS = 4  # kernels/moe_experts.mojo: experts with at most this many rows stream the weights
Q8_STREAM_MAX_ROWS = 16  # kernels/moe_experts.mojo: Q8_0 experts with more rows take a GEMM (bf16-dot, DEQUANT),
Q8_LANES_MAX_ROWS = 256  # except on AVX512_VNNI, where they stream on the vector lanes up to this many rows


def q8_stream_max_rows() -> int:
    """The most rows a Q8_0 expert streams with here (more take a GEMM): Q8_LANES_MAX_ROWS on AVX512_VNNI."""
    return Q8_LANES_MAX_ROWS if vnni_available() else Q8_STREAM_MAX_ROWS


def bf16_gemm(H: int, I: int) -> str:
    """The GEMM of bf16-weight experts with more than SMALL_ROWS rows: "amx" (H and I multiples of 32, AMX-BF16),
    "dot" (vdpbf16ps: H and I even and nonzero, AVX512_BF16) or "stream" (exact float32 activations). Mirrors
    `execute` in kernels/moe_experts.mojo."""
    if H > 0 and I > 0 and H % AMX_K_STEP == 0 and I % AMX_K_STEP == 0 and amx_available():
        return "amx"
    return "dot" if H > 0 and I > 0 and H % 2 == 0 and I % 2 == 0 and bf16_dot_available() else "stream"


def bf16_dot_experts(topk_ids, E: int, H: int, I: int, q8: bool = False) -> np.ndarray:
    """[E] bool: the experts the op computes with bf16-rounded activations (x and the SwiGLU output rounded to
    bf16). bf16 weights: every expert where the CPU has AVX512_BF16 and H and I are even (the bf16-dot or AMX GEMM
    above SMALL_ROWS rows, vdpbf16ps streaming below; otherwise every expert streams exact float32 activations).
    Q8_0 weights (q8): those with more than q8_stream_max_rows() rows where the CPU has AVX512_BF16 (the bf16-dot
    GEMM on the blocks' int8 values, each block's sum scaled by its d; Q8_0 never takes AMX)."""
    rows = np.bincount(np.asarray(topk_ids).reshape(-1), minlength=E)[:E]
    dot = H > 0 and I > 0 and H % 2 == 0 and I % 2 == 0 and bf16_dot_available()
    return (rows > (q8_stream_max_rows() if q8 else 0)) & dot


def int8_dot_experts(topk_ids, E: int) -> np.ndarray:
    """[E] bool: the experts the op computes on int8-quantized activations (Q8_0 weights): those that stream (at
    most Q8_LANES_MAX_ROWS rows) where the CPU has AVX512_VNNI (vpdpbusd; q8_0.quantize_activations), with the rows
    in the vector lanes from linear.Q8_LANES_MIN_M rows (the same int8 values, the same exact block sums)."""
    rows = np.bincount(np.asarray(topk_ids).reshape(-1), minlength=E)[:E]
    return (rows <= Q8_LANES_MAX_ROWS) & vnni_available()


def moe_experts_reference(x, topk_ids, topk_weights, gate_up, down, bf16_activations=None,
                          int8_activations=None) -> np.ndarray:
    """float64 spec: x [T, H], ids/weights [T, k], gate_up [E, 2I, H], down [E, H, I] -> [T, H].

    bf16_activations: optional [E] bool; for those experts x and the SwiGLU output are rounded to bfloat16
    before each matmul, as the op's bf16-dot path does (see `bf16_dot_experts`). int8_activations: the same with
    both quantized to int8 blocks (q8_0.quantize_activations), as the op's vpdpbusd path does
    (`int8_dot_experts`)."""
    def rounded(a, e):
        if int8_activations is not None and int8_activations[e]:
            return q8_0.quantize_activations(a.astype(np.float32))
        if bf16_activations is None or not bf16_activations[e]:
            return a
        return bf16_rounded(a.astype(np.float32)).astype(np.float64)

    x, gate_up, down = (np.asarray(a, np.float64) for a in (x, gate_up, down))
    I = down.shape[2]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(topk_ids[t], topk_weights[t]):
            h = gate_up[e] @ rounded(x[t], e)  # [2I]
            g = h[:I]
            out[t] += float(w) * (down[e] @ rounded(g / (1 + np.exp(-g)) * h[I:], e))
    return out


def moe_experts(x: TensorValue, topk_weights: TensorValue, expert_offsets: TensorValue, sorted_slots: TensorValue,
                gate_up: TensorValue, down: TensorValue) -> TensorValue:
    """Our op: float32 [T, H]. The offsets/slots come from `moe_router`'s dispatch metadata."""
    cpu = DeviceRef.CPU()
    return ops.custom("moe_experts", device=cpu, values=[x, topk_weights, expert_offsets, sorted_slots, gate_up, down],
                      out_types=[TensorType(DType.float32, x.shape, device=cpu)])[0].tensor


def experts_builtin(x: TensorValue, topk_ids: TensorValue, topk_weights: TensorValue,
                    gate_up: TensorValue, down: TensorValue) -> TensorValue:
    """MAX built-in peer. MAX's grouped matmul and MoE kernels are GPU-only, so on the CPU this runs every
    expert densely over every token (E/k times the work, exact math) and gathers each token's k results.
    It is the model-level reference, not a fast path. Returns float32 [T, H]."""
    T = x.shape[0]
    E, two_i, H = gate_up.shape
    I = int(two_i) // 2
    h = x @ ops.transpose(ops.reshape(gate_up, [E * two_i, H]), 0, 1)  # [T, E*2I]
    h = ops.transpose(ops.reshape(h, [T, E, two_i]), 0, 1)  # [E, T, 2I]
    act = ops.silu(h[:, :, :I]) * h[:, :, I:]  # [E, T, I]
    y = ops.transpose(act @ ops.transpose(down, 1, 2), 0, 1)  # [T, E, H]
    picked = ops.gather_nd(y, ops.unsqueeze(ops.cast(topk_ids, DType.int64), -1), batch_dims=1)  # [T, k, H]
    return ops.sum(ops.cast(picked, DType.float32) * ops.unsqueeze(topk_weights, -1), axis=1).reshape([T, H])
