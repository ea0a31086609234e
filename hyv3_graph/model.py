"""The Hy3 graph, built by hand with `max.graph`: embedding -> decoder layers -> norm -> lm_head.

One subgraph body per layer kind ("dense", "sparse"), built once and called per layer with
`ops.call(..., prefix="layers.{i}.")`, which binds the body's placeholder weights to that
layer's tensors. Compile time therefore stays flat as depth grows.

Inputs (ragged batch): tokens [T] (all new tokens of all sequences, concatenated),
input_row_offsets [B + 1] uint32, then the paged KV cache inputs (`kv_cache.py`).
Output: float32 logits [B, V] of each sequence's last new token; with `expert_stats` (custom kernels only)
also int32 [n_sparse, E]: how many of the step's tokens each expert took in each sparse layer, the
differences of the router op's own dispatch offsets (no extra pass over the router logits).

Weights are in the model dtype, except with quant="q8_0": every matmul weight is then Q8_0 bytes (uint8, the last
dim K / 32 * 34: hyv3_graph/q8_0.py), read by our ops only (--kernels custom), and the model dtype (activations,
KV cache, embedding, norms) is float32.

Shapes: T = total new tokens, H = hidden, Hq/Hkv = heads, D = head_dim, E = experts,
k = experts per token, I = expert width, S = shared-expert width, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, Graph, TensorType, TensorValue, Weight, ops
from max.nn.kv_cache import MHAKVCacheParams

from . import q8_0
from .config import HYV3Config
from .kernels import MOJO_KERNELS
from .kernels.attention import attention, attention_builtin
from .kernels.linear import linear, linear_builtin, swiglu_mlp
from .kernels.moe_experts import experts_builtin, moe_experts
from .kernels.moe_router import moe_router, moe_router_builtin
from .kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_builtin

CPU = DeviceRef.CPU()
KERNEL_BACKENDS = ("builtin", "custom")


@dataclass(frozen=True)
class Kernels:
    """Which implementation the hot spots use: `custom` = our Mojo ops (every dense projection, router, experts,
    attention), `builtin` = MAX's own ops (its matmul; the experts densely, as MAX's MoE kernels are GPU-only)."""

    backend: str = "builtin"

    def __post_init__(self):
        if self.backend not in KERNEL_BACKENDS:
            raise ValueError(f"--kernels must be one of {KERNEL_BACKENDS}, got {self.backend!r}")

    @property
    def custom(self) -> bool:
        return self.backend == "custom"


def rope_freqs_cis(head_dim: int, theta: float, n_positions: int) -> np.ndarray:
    """[n_positions, D] float32, (cos, sin) interleaved per frequency: the layout MAX's fused rope and our
    attention op read.

    Computed the way HF does (inv_freq and angles in float32) so positions far out agree too.
    """
    D = head_dim
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D)))).astype(np.float32)
    angles = np.arange(n_positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # [P, D/2]
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1).reshape(n_positions, D).astype(np.float32)


def _w(name: str, dtype: DType, shape) -> TensorValue:
    """A subgraph weight, bound per layer by `ops.call(prefix=...)`."""
    return Weight(name, dtype, shape, device=CPU, _placeholder=True)


class HYV3Graph:
    def __init__(self, cfg: HYV3Config, dtype: DType, kv_params: MHAKVCacheParams, n_positions: int,
                 kernels: Kernels = Kernels(), expert_stats: bool = False, quant: str | None = None):
        if expert_stats and not kernels.custom:
            raise ValueError("expert stats come from our router op: they need --kernels custom")
        if quant is not None and (quant != "q8_0" or not kernels.custom or dtype != DType.float32):
            raise ValueError(f"quant={quant!r}: only q8_0, with --kernels custom and float32 activations")
        self.quant = quant
        self.cfg, self.dtype, self.kv_params, self.n_positions, self.kernels = cfg, dtype, kv_params, n_positions, kernels
        self.expert_stats = expert_stats

    def _mat_type(self, *shape: int) -> tuple[DType, list[int]]:
        """(dtype, shape) of a matmul weight [..., K]: the model dtype, or Q8_0 bytes [..., K / 32 * 34]."""
        if self.quant:
            return DType.uint8, [*shape[:-1], q8_0.row_bytes(shape[-1])]
        return self.dtype, list(shape)

    def _mw(self, name: str, *shape: int) -> TensorValue:
        """A layer's matmul weight placeholder (see `_mat_type`)."""
        return _w(name, *self._mat_type(*shape))

    def _linear(self, x: TensorValue, w: TensorValue) -> TensorValue:
        """x [T, in] @ w[out, in]^T -> [T, out] (HF's nn.Linear layout): our `linear` op or MAX's matmul."""
        return linear(x, w) if self.kernels.custom else linear_builtin(x, w)

    def _norm(self, x: TensorValue, w: TensorValue) -> TensorValue:
        """RMSNorm (HF's order): our one-op `rms_norm`, or MAX's chain of ops."""
        eps = self.cfg.rms_norm_eps
        return rms_norm(x, w, eps) if self.kernels.custom else rms_norm_builtin(x, w, eps)

    def _add_norm(self, x: TensorValue, d: TensorValue, w: TensorValue) -> tuple[TensorValue, TensorValue]:
        """(x + d, RMSNorm(x + d)): the residual add and the norm after it, one op with custom kernels."""
        if self.kernels.custom:
            return add_rms_norm(x, d, w, self.cfg.rms_norm_eps)
        s = x + d
        return s, rms_norm_builtin(s, w, self.cfg.rms_norm_eps)

    def _extensions(self) -> list:
        """Our Mojo package only for `custom`: a builtin graph then stays cached when a kernel changes."""
        return [MOJO_KERNELS] if self.kernels.custom else []

    def input_types(self) -> list:
        return [TensorType(DType.int64, ["total_seq_len"], device=CPU),
                TensorType(DType.uint32, ["input_row_offsets_len"], device=CPU),
                *self.kv_params.flattened_kv_inputs()]

    def extra_weights(self) -> dict[str, np.ndarray]:
        """Weights the graph makes itself rather than reads from the checkpoint."""
        return {"rope.freqs_cis": rope_freqs_cis(self.cfg.head_dim, self.cfg.rope_theta, self.n_positions)}

    def build(self) -> Graph:
        cfg, dt = self.cfg, self.dtype
        H, V = cfg.hidden_size, cfg.vocab_size
        with Graph("hyv3", input_types=self.input_types(), custom_extensions=self._extensions()) as g:
            tokens, row_offsets, *kv_inputs = g.inputs
            freqs = Weight("rope.freqs_cis", DType.float32, [self.n_positions, cfg.head_dim], device=CPU)
            layer_bodies = {kind: self._layer_subgraph(g, kind) for kind in sorted(set(cfg.mlp_layer_types))}

            x = ops.gather(Weight("embed_tokens.weight", dt, [V, H], device=CPU), tokens.tensor, axis=0)  # [T, H]
            counts = []  # [E] per sparse layer, with expert_stats
            for i, kind in enumerate(cfg.mlp_layer_types):
                layer_idx = ops.constant(i, DType.uint32, device=CPU)
                x, *stats = ops.call(layer_bodies[kind], x, row_offsets, layer_idx, freqs, *kv_inputs, prefix=f"layers.{i}.")
                x = x.tensor
                counts += [c.tensor for c in stats]

            last = ops.cast(row_offsets.tensor[1:], DType.int64) - 1  # [B] index of each sequence's last token
            h = self._norm(ops.gather(x, last, axis=0), Weight("norm.weight", dt, [H], device=CPU))  # [B, H]
            logits = self._linear(h, Weight("lm_head.weight", *self._mat_type(V, H), device=CPU))  # [B, V]
            if self.expert_stats and counts:
                g.output(ops.cast(logits, DType.float32), ops.stack(counts, axis=0))  # [B, V], [n_sparse, E]
            else:
                g.output(ops.cast(logits, DType.float32))
        return g

    def _layer_subgraph(self, g: Graph, kind: str) -> Graph:
        cfg, dt = self.cfg, self.dtype
        H, D = cfg.hidden_size, cfg.head_dim
        types = [TensorType(dt, ["total_seq_len", H], device=CPU),
                 TensorType(DType.uint32, ["input_row_offsets_len"], device=CPU),
                 TensorType(DType.uint32, [], device=CPU),
                 TensorType(DType.float32, [self.n_positions, D], device=CPU),
                 *self.kv_params.flattened_kv_inputs()]
        with g.add_subgraph(f"{kind}_layer", input_types=types, custom_extensions=self._extensions()) as sub:
            x, row_offsets, layer_idx, freqs, *kv_inputs = sub.inputs
            x, row_offsets, layer_idx = x.tensor, row_offsets.tensor, layer_idx.tensor
            kv = self.kv_params.unflatten_kv_inputs(iter(kv_inputs))[0]

            h = self._norm(x, _w("input_layernorm.weight", dt, [H]))  # [T, H]
            attn = self._linear(self._attention(h, row_offsets, layer_idx, freqs.tensor, kv),
                                self._mw("self_attn.o_proj.weight", H, cfg.q_dim))  # [T, H]
            x, h = self._add_norm(x, attn, _w("post_attention_layernorm.weight", dt, [H]))  # [T, H] each
            if kind == "dense":
                sub.output(x + self._dense_mlp(h))  # [T, H]
            else:
                mlp, counts = self._moe(h)  # [T, H], [E]
                sub.output(x + mlp, *([counts] if self.expert_stats else []))
        return sub

    def _attention(self, h: TensorValue, row_offsets: TensorValue, layer_idx: TensorValue, freqs: TensorValue,
                   kv) -> TensorValue:
        """[T, H] -> [T, Hq*D]; writes this step's K/V into the paged cache."""
        cfg, dt, eps = self.cfg, self.dtype, self.cfg.rms_norm_eps
        wqkv = self._mw("self_attn.qkv_proj.weight", cfg.q_dim + 2 * cfg.kv_dim, cfg.hidden_size)
        q_norm, k_norm = _w("self_attn.q_norm.weight", dt, [cfg.head_dim]), _w("self_attn.k_norm.weight", dt, [cfg.head_dim])
        if self.kernels.custom:
            qkv = self._linear(h, wqkv)  # [T, (Hq + 2Hkv) * D]
            o = attention(qkv, q_norm, k_norm, freqs, row_offsets, kv.kv_blocks, kv.cache_lengths, kv.lookup_table,
                          layer_idx, eps)  # [T, Hq, D]
            return ops.reshape(o, [h.shape[0], cfg.q_dim])
        return attention_builtin(self.kv_params, h, row_offsets, kv, layer_idx, wqkv=wqkv, q_norm=q_norm,
                                 k_norm=k_norm, freqs_cis=ops.cast(freqs, dt), n_heads=cfg.num_attention_heads,
                                 eps=eps)  # [T, Hq*D]

    def _dense_mlp(self, h: TensorValue) -> TensorValue:
        H, I = self.cfg.hidden_size, self.cfg.intermediate_size
        return swiglu_mlp(h, self._mw("mlp.gate_proj.weight", I, H), self._mw("mlp.up_proj.weight", I, H),
                          self._mw("mlp.down_proj.weight", H, I), self.kernels.custom)  # [T, H]

    def _moe(self, h: TensorValue) -> tuple[TensorValue, TensorValue | None]:
        """[T, H] -> ([T, H], tokens per expert [E] int32 with expert_stats, else None)."""
        cfg, dt = self.cfg, self.dtype
        H, E, I, S = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_intermediate_size
        router_logits = self._linear(ops.cast(h, DType.float32), _w("mlp.router.weight", DType.float32, [E, H]))  # [T, E]
        bias = _w("mlp.expert_bias", DType.float32, [E])
        gate_up, down = self._mw("mlp.experts.gate_up", E, 2 * I, H), self._mw("mlp.experts.down", E, H, I)
        k, scale = cfg.num_experts_per_tok, cfg.router_scaling_factor
        if self.kernels.custom:
            _, topk_w, offsets, slots = moe_router(router_logits, bias, k, scale, cfg.route_norm)  # [T, k], [E+1], [T*k]
            routed = moe_experts(ops.cast(h, DType.float32), topk_w, offsets, slots, gate_up, down)  # [T, H] float32
            counts = offsets[1:] - offsets[:-1] if self.expert_stats else None  # [E] tokens per expert
        else:
            topk_ids, topk_w = moe_router_builtin(router_logits, bias, k, scale, cfg.route_norm)  # [T, k]
            routed = experts_builtin(h, topk_ids, topk_w, gate_up, down)  # [T, H] float32
            counts = None
        if cfg.num_shared_experts:
            shared = swiglu_mlp(h, self._mw("mlp.shared.gate_proj.weight", S, H),
                                self._mw("mlp.shared.up_proj.weight", S, H), self._mw("mlp.shared.down_proj.weight", H, S),
                                self.kernels.custom)  # [T, H]
            if cfg.enable_moe_fp32_combine:
                return ops.cast(routed + ops.cast(shared, DType.float32), dt), counts
            return ops.cast(routed, dt) + shared, counts
        return ops.cast(routed, dt), counts
