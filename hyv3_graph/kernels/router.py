"""MoE router: sigmoid scores + fp32 correction bias -> top-k experts, unbiased weights, renorm, scale.

Semantics (HF `HYV3TopKRouter`): score = sigmoid(logit); choose the k experts with the largest
score + bias; weight = the UNBIASED score of each chosen expert; if renormalize,
w / (sum(w) + 1e-20); times the scaling factor. HF's own top-k is unsorted; ours is defined:
the k outputs are in descending order of score + bias, and on equal score + bias the lower
expert index wins.
"""

from __future__ import annotations

import numpy as np
from max.dtype import DType
from max.graph import TensorValue, ops


def router_reference(logits: np.ndarray, bias: np.ndarray, k: int, scale: float, renormalize: bool = True):
    """Numpy spec: (topk_ids [T, k] int32, topk_weights [T, k] float32)."""
    logits = np.asarray(logits, np.float32)
    scores = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    choice = scores + np.asarray(bias, np.float32)[None, :]
    # stable sort on -choice: equal values keep ascending expert order, so the lower index wins
    ids = np.argsort(-choice, axis=1, kind="stable")[:, :k].astype(np.int32)
    w = np.take_along_axis(scores, ids, axis=1)
    if renormalize:
        w = w / (w.sum(axis=1, keepdims=True, dtype=np.float32) + np.float32(1e-20))
    return ids, (w * np.float32(scale)).astype(np.float32)


def router_builtin(logits: TensorValue, bias: TensorValue, k: int, scale: float, renormalize: bool = True):
    """The same math as a chain of MAX built-in ops: (topk_ids [T, k] int32, topk_weights [T, k] float32)."""
    scores = ops.sigmoid(logits)  # [T, E]
    _, ids = ops.top_k(scores + bias, k, axis=-1)  # [T, k]
    w = ops.gather_nd(scores, ops.unsqueeze(ids, -1), batch_dims=1)  # [T, k]
    if renormalize:
        w = w / (ops.sum(w, axis=-1) + 1e-20)
    return ops.cast(ids, DType.int32), w * scale
