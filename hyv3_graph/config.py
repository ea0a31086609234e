"""Typed Hy3 (`HYV3ForCausalLM`) config, read from a checkpoint's config.json.

Accepts both the real Hy3-preview config (extra fields such as
`num_nextn_predict_layers`, `qk_norm`, top-level `rope_theta`) and the one that
transformers' `HYV3Config.save_pretrained` writes (`rope_parameters`,
`mlp_layer_types`, `num_experts`). Everything the graph needs is derived from
here; nothing about a particular checkpoint is hard-coded elsewhere.

A missing or invalid field raises `ConfigError` naming the field and the file,
so a bad checkpoint fails before any weight is read or any graph is compiled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json field is missing or has an invalid value."""


@dataclass(frozen=True)
class HYV3Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense SwiGLU layers
    moe_intermediate_size: int  # each routed expert, and each shared expert
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    router_scaling_factor: float
    route_norm: bool
    mlp_layer_types: tuple[str, ...]  # "dense" | "sparse", one per layer
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    enable_moe_fp32_combine: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None = None  # config `dtype` / `torch_dtype`: the checkpoint's own dtype, when it says
    source: str = field(default="<dict>", compare=False)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def shared_intermediate_size(self) -> int:
        """HF fuses all shared experts into one MLP of this width."""
        return self.moe_intermediate_size * self.num_shared_experts

    def is_sparse(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == "sparse"

    def summary(self) -> str:
        n_sparse = sum(self.is_sparse(i) for i in range(self.num_hidden_layers))
        return (
            f"HYV3: {self.num_hidden_layers} layers ({self.num_hidden_layers - n_sparse} dense, "
            f"{n_sparse} MoE), hidden {self.hidden_size}, heads {self.num_attention_heads} q / "
            f"{self.num_key_value_heads} kv x {self.head_dim}, experts {self.num_experts} "
            f"top-{self.num_experts_per_tok} (I={self.moe_intermediate_size}, "
            f"{self.num_shared_experts} shared, scale {self.router_scaling_factor}), "
            f"dense I={self.intermediate_size}, vocab {self.vocab_size}, "
            f"rope theta {self.rope_theta:g}, tied embeddings {self.tie_word_embeddings}"
        )

    @classmethod
    def from_file(cls, path: str | Path) -> HYV3Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> HYV3Config:
        r = _Reader(raw, source)
        n_layers = r.int("num_hidden_layers", minimum=1)
        n_heads = r.int("num_attention_heads", minimum=1)
        n_kv = r.int("num_key_value_heads", minimum=1)
        if n_heads % n_kv:
            raise r.error("num_key_value_heads", f"{n_kv} does not divide num_attention_heads={n_heads}")
        hidden = r.int("hidden_size", minimum=1)
        head_dim = r.int("head_dim", minimum=2)
        if head_dim % 2:
            raise r.error("head_dim", f"{head_dim} must be even for split-half RoPE")
        n_experts = r.int(("num_experts", "num_local_experts"), minimum=1)
        top_k = r.int("num_experts_per_tok", minimum=1)
        if top_k > n_experts:
            raise r.error("num_experts_per_tok", f"{top_k} exceeds num_experts={n_experts}")
        eos = r.get("eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
            raise r.error("eos_token_id", f"expected an int or a list of ints, got {eos!r}")
        return cls(
            vocab_size=r.int("vocab_size", minimum=1),
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=r.int("intermediate_size", minimum=1),
            moe_intermediate_size=r.int("moe_intermediate_size", minimum=1),
            num_experts=n_experts,
            num_experts_per_tok=top_k,
            num_shared_experts=r.int("num_shared_experts", minimum=0, default=1),
            router_scaling_factor=r.float("router_scaling_factor", default=2.826),
            route_norm=r.bool("route_norm", default=True),
            mlp_layer_types=_mlp_layer_types(r, n_layers),
            rope_theta=_rope_theta(r),
            rms_norm_eps=r.float("rms_norm_eps", positive=True),
            tie_word_embeddings=r.bool("tie_word_embeddings", default=False),
            enable_moe_fp32_combine=r.bool("enable_moe_fp32_combine", default=True),
            max_position_embeddings=r.int("max_position_embeddings", minimum=1),
            bos_token_id=r.get("bos_token_id", None),
            eos_token_ids=eos_ids,
            torch_dtype=_torch_dtype(r),
            source=source,
        )


def _mlp_layer_types(r: _Reader, n_layers: int) -> tuple[str, ...]:
    """`mlp_layer_types` when present, else the first `first_k_dense_replace` (default 1) are dense."""
    types = r.get("mlp_layer_types", None)
    if types is None:
        k = r.int("first_k_dense_replace", minimum=0, default=1)
        return tuple("dense" if i < k else "sparse" for i in range(n_layers))
    if not isinstance(types, list) or len(types) != n_layers or not set(types) <= {"dense", "sparse"}:
        raise r.error("mlp_layer_types", f"expected {n_layers} entries of 'dense'/'sparse', got {types!r}")
    return tuple(types)


def _torch_dtype(r: _Reader) -> str | None:
    v = r.get(("dtype", "torch_dtype"), None)
    if v is not None and not isinstance(v, str):
        raise r.error("dtype", f"expected a dtype name such as 'bfloat16', got {v!r}")
    return v.removeprefix("torch.") if v else None


def _rope_theta(r: _Reader) -> float:
    params = r.get("rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise r.error("rope_parameters.rope_type", f"only 'default' RoPE is supported, got {rope_type!r}")
        theta = params["rope_theta"]
    elif "rope_theta" in r.raw:
        theta = r.raw["rope_theta"]
    else:
        raise r.error("rope_parameters.rope_theta", "missing (nor is there a top-level rope_theta)")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise r.error("rope_theta", f"expected a positive number, got {theta!r}")
    return float(theta)


_REQUIRED = object()


class _Reader:
    def __init__(self, raw: dict[str, Any], source: str):
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        self.raw, self.source = raw, source

    def error(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{name}': {why}")

    def get(self, names: str | tuple[str, ...], default: Any = _REQUIRED) -> Any:
        names = (names,) if isinstance(names, str) else names
        for n in names:
            if n in self.raw and self.raw[n] is not None:
                return self.raw[n]
        if default is _REQUIRED:
            raise self.error(" / ".join(names), "missing")
        return default

    def int(self, names, minimum: int = 0, default: Any = _REQUIRED) -> int:
        v = self.get(names, default)
        name = names if isinstance(names, str) else names[0]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.error(name, f"expected an integer >= {minimum}, got {v!r}")
        return v

    def float(self, name: str, positive: bool = False, default: Any = _REQUIRED) -> float:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (positive and v <= 0):
            raise self.error(name, f"expected a {'positive ' if positive else ''}number, got {v!r}")
        return float(v)

    def bool(self, name: str, default: Any = _REQUIRED) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise self.error(name, f"expected true/false, got {v!r}")
        return v
