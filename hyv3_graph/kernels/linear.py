"""Dense linear layers: y = x @ w^T, and the fused SwiGLU silu(x @ gate^T) * (x @ up^T).

Our Mojo ops: `kernels/linear.mojo` (`linear`, `linear_swiglu`, and their Q8_0-weight forms `linear_q8_0`,
`linear_swiglu_q8_0`; its header explains the paths; `linear_dot_peak` and `linear_stream_peak` are the bench's
yardsticks for the GEMM and streaming paths). Here: their graph wrappers (a uint8 weight is Q8_0 bytes,
hyv3_graph/q8_0.py, and takes the Q8_0 op), the MAX built-in peer (`linear_builtin`), which path a call takes
(`linear_path`), and the float64 numpy reference. Fuzz test: tests/test_linear.py; bench: bench/cases/linear.py.
"""

from __future__ import annotations

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, TensorType, TensorValue, ops

from .cpu_isa import AMX_K_STEP, amx_available, bf16_dot_available, vnni_available

STREAM_MAX_M = 16  # kernels/linear.mojo: at most this many rows stream the weights
Q8_LANES_MIN_M = 6  # kernels/microkernels.mojo: Q8_0 streaming puts x's rows in the lanes from this many rows,
Q8_LANES_NARROW_M = 8  # in 8 lanes (ymm) up to this many rows, in 16 above (microkernels.q8_lane_width)
INT8_X_PATHS = ("vnni", "lanes")  # the paths that dot x's int8 blocks (q8_0.quantize_activations), not x
DOT_TILE_FLOPS = 8 * 3 * 128 * 64  # one microkernels.dot_tile call: MR x NVMAX x KC vdpbf16ps of 64 flops each


def linear_path(M: int, K: int, bf16: bool, q8: bool = False) -> str:
    """The path kernels/linear.mojo takes for an [M, K] input: "stream", "amx" (AMX bf16 tiles), "dot" (bf16-dot
    GEMM), "matmul" (MAX's float32 matmul) or, for Q8_0 weights (q8), "vnni" (streaming on vpdpbusd, x quantized to
    int8: q8_0.quantize_activations), "lanes" (the same with x's rows in the vector lanes, from Q8_LANES_MIN_M rows),
    "stream", "dot" (the bf16-dot GEMM on the blocks' int8 values, each block's
    sum scaled by its d; x rounded to bf16) or "dequant" (float32 rows into MAX's matmul). Mirrors `_path` there;
    the tests use it to cover every path and to pick the reference's activations."""
    if M <= STREAM_MAX_M:
        if q8 and vnni_available():
            return "lanes" if M >= Q8_LANES_MIN_M else "vnni"
        return "stream"
    if q8:
        return "dot" if bf16_dot_available() else "dequant"
    if not bf16:
        return "matmul"
    if K > 0 and K % AMX_K_STEP == 0 and amx_available():
        return "amx"
    return "dot" if K % 2 == 0 and bf16_dot_available() else "stream"


def linear_reference(x, w, up=None) -> np.ndarray:
    """float64 spec: x [M, K] @ w[N, K]^T -> [M, N]; with `up` (w is then the gate), silu(x @ w^T) * (x @ up^T).
    The op's inputs are float32 or bf16 values (exact in float64); it sums in float32 and rounds a bf16 output
    once, which the tests' tolerances allow for."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y = x @ w.T
    if up is None:
        return y
    return y / (1.0 + np.exp(-y)) * (x @ np.asarray(up, np.float64).T)


def _op(name: str, w: TensorValue) -> str:
    """The dense op, or its Q8_0 form for a uint8 weight (Q8_0 bytes [N, K / 32 * 34])."""
    return f"{name}_q8_0" if w.dtype == DType.uint8 else name


def linear(x: TensorValue, w: TensorValue) -> TensorValue:
    """Our op: x [M, K] @ w[N, K]^T -> [M, N] in x's dtype (float32 or bfloat16); w in x's dtype, or Q8_0 bytes
    (uint8 [N, K / 32 * 34]: x @ dequantize(w)^T)."""
    return ops.custom(_op("linear", w), device=DeviceRef.CPU(), values=[x, w],
                      out_types=[TensorType(x.dtype, [x.shape[0], w.shape[0]], device=DeviceRef.CPU())])[0].tensor


def linear_swiglu(x: TensorValue, gate: TensorValue, up: TensorValue) -> TensorValue:
    """Our op: silu(x @ gate^T) * (x @ up^T) -> [M, I], gate and up [I, K] (no concatenated copy), both in x's dtype
    or both Q8_0 bytes."""
    return ops.custom(_op("linear_swiglu", gate), device=DeviceRef.CPU(), values=[x, gate, up],
                      out_types=[TensorType(x.dtype, [x.shape[0], gate.shape[0]], device=DeviceRef.CPU())])[0].tensor


def linear_builtin(x: TensorValue, w: TensorValue) -> TensorValue:
    """MAX built-in peer: x @ transpose(w) (HF's nn.Linear layout), MAX's CPU matmul."""
    return x @ ops.transpose(w, 0, 1)


def linear_swiglu_builtin(x: TensorValue, gate: TensorValue, up: TensorValue) -> TensorValue:
    return ops.silu(linear_builtin(x, gate)) * linear_builtin(x, up)


def linear_dot_peak(reps: TensorValue, workers: int) -> TensorValue:
    """The bf16-dot micro-kernel's own peak: every one of `workers` cores runs reps[0] x dot_tile on L1-resident
    operands (DOT_TILE_FLOPS each); output [workers] float32, each exactly 2 * reps[0]. Needs AVX512_BF16."""
    return ops.custom("linear_dot_peak", device=DeviceRef.CPU(), values=[reps],
                      out_types=[TensorType(DType.float32, [workers], device=DeviceRef.CPU())])[0].tensor


def linear_stream_peak(x: TensorValue, w: TensorValue, reps: TensorValue, workers: int) -> TensorValue:
    """The streaming path's compute ceiling: every one of `workers` cores runs `linear`'s STREAM path (x [M, K], M
    1..16; w in x's dtype or Q8_0 bytes) reps[0] times over on w, which the caller sizes to stay in one core's L2;
    output [workers, M, N] in x's dtype, each worker's x @ w^T (bit for bit `linear`'s). Weight bytes over time
    is the rate the path's loop can consume when memory keeps up (bench/cases/linear.py, `stream_peak` cases)."""
    y = TensorType(x.dtype, [workers, x.shape[0], w.shape[0]], device=DeviceRef.CPU())
    return ops.custom(_op("linear_stream_peak", w), device=DeviceRef.CPU(), values=[x, w, reps], out_types=[y])[0].tensor


def swiglu_mlp(x: TensorValue, gate: TensorValue, up: TensorValue, down: TensorValue, custom: bool) -> TensorValue:
    """A SwiGLU MLP, down(silu(gate(x)) * up(x)): two calls of our ops, or MAX's matmuls."""
    if custom:
        return linear(linear_swiglu(x, gate, up), down)
    return linear_builtin(linear_swiglu_builtin(x, gate, up), down)
