"""MoE experts: per token, sum over its k chosen experts of weight * SwiGLU expert(x).

`experts_builtin` is the MAX built-in peer: MAX's grouped matmul and MoE kernels are GPU-only,
so on the CPU it runs every expert densely over every token (E/k times the work, exact math)
and gathers each token's k results. It is the model-level reference, not a fast path.
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import TensorValue, ops


def experts_builtin(x: TensorValue, topk_ids: TensorValue, topk_weights: TensorValue,
                    gate_up: TensorValue, down: TensorValue) -> TensorValue:
    """x [T, H], topk_ids/weights [T, k], gate_up [E, 2I, H], down [E, H, I] -> float32 [T, H]."""
    T = x.shape[0]
    E, two_i, H = gate_up.shape
    I = int(two_i) // 2
    h = x @ ops.transpose(ops.reshape(gate_up, [E * two_i, H]), 0, 1)  # [T, E*2I]
    h = ops.transpose(ops.reshape(h, [T, E, two_i]), 0, 1)  # [E, T, 2I]
    act = ops.silu(h[:, :, :I]) * h[:, :, I:]  # [E, T, I]
    y = act @ ops.transpose(down, 1, 2)  # [E, T, H]
    y = ops.transpose(y, 0, 1)  # [T, E, H]
    picked = ops.gather_nd(y, ops.unsqueeze(ops.cast(topk_ids, DType.int64), -1), batch_dims=1)  # [T, k, H]
    return ops.sum(ops.cast(picked, DType.float32) * ops.unsqueeze(topk_weights, -1), axis=1).reshape([T, H])
