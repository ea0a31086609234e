"""RMSNorm, alone or fused with the residual add before it.

Our Mojo ops: `kernels/rms_norm.mojo` (`rms_norm`, `add_rms_norm`; its header has the semantics and why the op
exists: at decode the norm's cost is MAX's op count, not its bytes). Here: their graph wrappers, the MAX built-in
peer (`rms_norm_builtin`: the chain of MAX ops `--kernels builtin` runs), and the numpy reference. Fuzz test:
tests/test_rms_norm.py; bench: bench/cases/rms_norm.py.
"""

from __future__ import annotations

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, TensorType, TensorValue, ops

from ..dtypes import bf16_rounded


def _round(a: np.ndarray, bf16: bool) -> np.ndarray:
    return bf16_rounded(a) if bf16 else a.astype(np.float32)


def rms_norm_reference(x, w, eps: float, bf16: bool = False, d=None):
    """Numpy spec on float32 values (bf16 inputs widened): with d, (s, y) for s = dt(x + d) and y the norm of s;
    else y. y = dt(w * dt(x * rsqrt(mean(x^2) + eps))) in float32 (HF's order), dt = bf16 rounding where bf16; the
    mean summed in float64 (the op sums in float32: the tests allow for that in the normalization's last bits)."""
    x = np.asarray(x, np.float32)
    s = x if d is None else _round(x + np.asarray(d, np.float32), bf16)  # [T, H]
    ms = np.mean(s.astype(np.float64) ** 2, axis=-1, keepdims=True)  # [T, 1]
    inv = (np.float32(1) / np.sqrt((ms + eps).astype(np.float32))).astype(np.float32)  # [T, 1]
    normed = _round(s * inv, bf16)
    y = _round(np.asarray(w, np.float32)[None, :] * normed, bf16)
    return y if d is None else (s, y)


def rms_norm(x: TensorValue, w: TensorValue, eps: float) -> TensorValue:
    """Our op: x [T, H], w [H] (one dtype, float32 or bfloat16) -> [T, H]."""
    cpu = DeviceRef.CPU()
    return ops.custom("rms_norm", device=cpu, values=[x, w], out_types=[TensorType(x.dtype, x.shape, device=cpu)],
                      parameters={"eps": float(eps)})[0].tensor


def add_rms_norm(x: TensorValue, d: TensorValue, w: TensorValue, eps: float) -> tuple[TensorValue, TensorValue]:
    """Our fused op: x, d [T, H], w [H] -> (s = x + d, rms_norm(s, w)), both [T, H] in x's dtype."""
    cpu = DeviceRef.CPU()
    s, y = ops.custom("add_rms_norm", device=cpu, values=[x, d, w],
                      out_types=[TensorType(x.dtype, x.shape, device=cpu), TensorType(x.dtype, x.shape, device=cpu)],
                      parameters={"eps": float(eps)})
    return s.tensor, y.tensor


def rms_norm_builtin(x: TensorValue, w: TensorValue, eps: float) -> TensorValue:
    """The same norm as MAX ops (HF's order: normalize in float32, cast back, scale by the weight in x's dtype)."""
    x32 = ops.cast(x, DType.float32)
    normed = x32 / ops.sqrt(ops.mean(x32 * x32, axis=-1) + eps)  # mean keeps the axis: [T, 1]
    return w * ops.cast(normed, x.dtype)
