"""bfloat16 in numpy: numpy has no bf16, so bf16 tensors live as uint16 bit patterns.

One place for the conversions, used by the weight loader, the graph inputs and the tests.
"""

from __future__ import annotations

import numpy as np
from max.driver import Buffer
from max.dtype import DType

DTYPES = {"float32": DType.float32, "bfloat16": DType.bfloat16}


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 bit patterns (uint16)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_rounded(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (round to nearest even), still as float32."""
    return bf16_bits_to_f32(f32_to_bf16_bits(a))


def to_dtype(a: np.ndarray, dtype: DType) -> np.ndarray:
    """Float array (float32, float16, or bf16 bits as uint16 = already bf16) in the model dtype's numpy form."""
    if dtype == DType.float32:
        return bf16_bits_to_f32(a) if a.dtype == np.uint16 else np.ascontiguousarray(a, dtype=np.float32)
    if dtype == DType.bfloat16:
        return np.ascontiguousarray(a) if a.dtype == np.uint16 else f32_to_bf16_bits(a.astype(np.float32))
    raise ValueError(f"unsupported model dtype {dtype}")


def to_buffer(a: np.ndarray, dtype: DType) -> Buffer:
    """Numpy array in `to_dtype` form -> MAX Buffer of `dtype` (zero-copy where possible)."""
    buf = Buffer.from_numpy(np.ascontiguousarray(a))
    return buf.view(DType.bfloat16) if dtype == DType.bfloat16 and a.dtype == np.uint16 else buf


def buffer_numpy(buf: Buffer) -> np.ndarray:
    """A CPU Buffer's data in `to_dtype` form (bf16 as uint16 bits), sharing its memory."""
    return buf.view(DType.uint16).to_numpy() if buf.dtype == DType.bfloat16 else buf.to_numpy()
