"""MoE router: sigmoid scores + fp32 correction bias -> top-k experts, unbiased weights, renorm, scale.

Our Mojo op: `kernels/moe_router.mojo` (its header defines tie-breaking, output order, NaN handling
and the dispatch metadata). Here: its graph wrapper, its MAX built-in peer, and the numpy reference
that is the spec. Fuzz test: tests/test_moe_router.py; bench: bench/cases/moe_router.py.
"""

from __future__ import annotations

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, TensorType, TensorValue, ops


def moe_router_scores(logits: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (scores, keys): sigmoid scores (a NaN logit scores 0, as -inf would) and the ranking keys
    score + bias (a NaN key ranks as -inf)."""
    logits = np.asarray(logits, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        scores = (np.float32(1) / (np.float32(1) + np.exp(-logits))).astype(np.float32)
        scores = np.where(np.isnan(logits), np.float32(0), scores)
        key = scores + np.asarray(bias, np.float32)[None, :]
    return scores, np.where(np.isnan(key), np.float32(-np.inf), key)


def moe_router_reference(logits: np.ndarray, bias: np.ndarray, k: int, scale: float, renormalize: bool = True):
    """Numpy spec: (topk_ids [T, k] int32, topk_weights [T, k] float32, expert_offsets [E+1], sorted_slots [T*k])."""
    scores, key = moe_router_scores(logits, bias)  # [T, E] each
    T, E = scores.shape
    # a stable sort on -key keeps equal keys in ascending expert order: the lower index wins
    ids = np.argsort(-key, axis=1, kind="stable")[:, :k].astype(np.int32)  # [T, k]
    w = np.take_along_axis(scores, ids, axis=1)
    den = (w.sum(axis=1, keepdims=True, dtype=np.float32) + np.float32(1e-20)) if renormalize else np.float32(1)
    with np.errstate(invalid="ignore"):
        weights = (w / den * np.float32(scale)).astype(np.float32)
    counts = np.bincount(ids.reshape(-1), minlength=E)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    slots = np.argsort(ids.reshape(-1), kind="stable").astype(np.int32)  # ascending slot = ascending token
    return ids, weights, offsets, slots


def moe_router(logits: TensorValue, bias: TensorValue, k: int, scale: float, renormalize: bool = True):
    """Our fused op: logits [T, E] f32, bias [E] f32 -> (ids [T, k] i32, weights [T, k] f32, offsets [E+1] i32, slots [T*k] i32)."""
    T, E = logits.shape
    cpu = DeviceRef.CPU()
    ids, weights, offsets, slots = ops.custom(
        "moe_router", device=cpu, values=[logits, bias],
        out_types=[TensorType(DType.int32, [T, k], device=cpu), TensorType(DType.float32, [T, k], device=cpu),
                   TensorType(DType.int32, [E + 1], device=cpu), TensorType(DType.int32, [T * k], device=cpu)],
        parameters={"top_k": k, "scale": float(scale), "renormalize": bool(renormalize)})
    return ids.tensor, weights.tensor, offsets.tensor, slots.tensor


def moe_router_builtin(logits: TensorValue, bias: TensorValue, k: int, scale: float, renormalize: bool = True):
    """The same math as a chain of MAX built-in ops: (topk_ids [T, k] int32, topk_weights [T, k] float32)."""
    scores = ops.sigmoid(logits)  # [T, E]
    _, ids = ops.top_k(scores + bias, k, axis=-1)  # [T, k]
    w = ops.gather_nd(scores, ops.unsqueeze(ids, -1), batch_dims=1)  # [T, k]
    if renormalize:
        w = w / (ops.sum(w, axis=-1) + 1e-20)
    return ops.cast(ids, DType.int32), w * scale
