"""Checkpoint loading: safetensors (single file or sharded index), two namings, one rename table.

Our names (what the graph's `Weight`s are called), per layer under `layers.{i}.`:

    input_layernorm.weight, post_attention_layernorm.weight   [H]
    self_attn.qkv_proj.weight   [(Hq + 2 Hkv) D, H]   q, k, v rows concatenated at load time
                                                       (the layout MAX's fused_qkv_ragged_matmul reads)
    self_attn.o_proj.weight     [H, Hq D]
    self_attn.q_norm.weight, self_attn.k_norm.weight   [D]
    dense:  mlp.{gate,up}_proj.weight [I, H], mlp.down_proj.weight [H, I]
    sparse: mlp.router.weight [E, H] float32, mlp.expert_bias [E] float32 (always fp32: a bf16
            expert bias changes which experts win), mlp.shared.{gate,up}_proj.weight [S, H],
            mlp.shared.down_proj.weight [H, S] (S = moe_intermediate_size * num_shared_experts),
            mlp.experts.gate_up [E, 2I, H]  rows 0..I-1 = gate, I..2I-1 = up (HF's fused layout)
            mlp.experts.down    [E, H, I]

plus `embed_tokens.weight` [V, H], `norm.weight` [H], `lm_head.weight` [V, H] (the embedding
when `tie_word_embeddings`). The MTP layer (`model.layers.{num_hidden_layers}.*`) is dropped.

Tensors are read lazily, one at a time (safetensors `safe_open`, or a memory map for bf16,
which numpy cannot name), and converted straight into the model dtype: no second full copy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from max.dtype import DType
from safetensors import safe_open

from .config import HYV3Config
from .dtypes import to_dtype


class WeightError(ValueError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape or dtype."""


# Our per-layer name -> checkpoint name, for each naming. The only place names are renamed.
_RENAMES = {
    "raw": {  # Hy3's own layout; also what transformers' save_pretrained writes
        "mlp.router.weight": "mlp.router.gate.weight",
        "mlp.expert_bias": "mlp.expert_bias",
        "mlp.shared.": "mlp.shared_mlp.",
    },
    "hf_fused": {  # transformers' in-memory module names
        "mlp.router.weight": "mlp.gate.weight",
        "mlp.expert_bias": "mlp.e_score_correction_bias",
        "mlp.shared.": "mlp.shared_experts.",
    },
}
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.path / f for name, f in weight_map.items()}
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise WeightError(f"{self.path}: no *.safetensors files and no model.safetensors.index.json")
            self.files = {}
            for f in shards:
                with safe_open(f, framework="numpy") as h:
                    self.files.update({name: f for name in h.keys()})
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}

    def names(self) -> set[str]:
        return set(self.files)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) without reading the data."""
        if name not in self._meta:
            with safe_open(self.files[name], framework="numpy") as h:
                sl = h.get_slice(name)
                self._meta[name] = (sl.get_dtype(), tuple(sl.get_shape()))
        return self._meta[name]

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32/float16, or bf16 bits as uint16."""
        dt, shape = self.meta(name)
        if dt not in _FLOAT_DTYPES:
            raise WeightError(f"tensor '{name}': expected a float dtype (F32/F16/BF16), found {dt}")
        if dt != "BF16":
            with safe_open(self.files[name], framework="numpy") as h:
                return h.get_tensor(name)
        return self._memmap_bf16(name, shape)

    def _memmap_bf16(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        f = self.files[name]
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            start, end = json.loads(fh.read(header_len))[name]["data_offsets"]
        n = int(np.prod(shape))
        assert end - start == 2 * n
        return np.memmap(f, dtype=np.uint16, mode="r", offset=8 + header_len + start, shape=shape)


@dataclass
class LoadedWeights:
    tensors: dict[str, np.ndarray]  # our names -> arrays in the model dtype's numpy form
    dtype: DType
    naming: str


def detect_naming(names: set[str]) -> str:
    """Which naming the whole checkpoint uses; mixing them is an error, never guessed per tensor."""
    fused = any(n.endswith("mlp.experts.gate_up_proj") for n in names)
    raw = any(n.endswith("mlp.router.gate.weight") or ".mlp.experts.0." in n for n in names)
    if fused and raw:
        raise WeightError("checkpoint mixes raw Hy3 expert names and transformers' fused names")
    return "hf_fused" if fused else "raw"


def expected_shapes(cfg: HYV3Config, naming: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> expected shape, for every tensor the model reads."""
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    E, I, S = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    ren = _RENAMES[naming]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (H,),
            "post_attention_layernorm.weight": (H,),
            "self_attn.q_proj.weight": (cfg.q_dim, H),
            "self_attn.k_proj.weight": (cfg.kv_dim, H),
            "self_attn.v_proj.weight": (cfg.kv_dim, H),
            "self_attn.o_proj.weight": (H, cfg.q_dim),
            "self_attn.q_norm.weight": (D,),
            "self_attn.k_norm.weight": (D,),
        }
        if not cfg.is_sparse(i):
            Id = cfg.intermediate_size
            layer |= {"mlp.gate_proj.weight": (Id, H), "mlp.up_proj.weight": (Id, H), "mlp.down_proj.weight": (H, Id)}
        else:
            layer[ren["mlp.router.weight"]] = (E, H)
            layer[ren["mlp.expert_bias"]] = (E,)
            if cfg.num_shared_experts:
                sh = ren["mlp.shared."]
                layer |= {f"{sh}gate_proj.weight": (S, H), f"{sh}up_proj.weight": (S, H), f"{sh}down_proj.weight": (H, S)}
            if naming == "hf_fused":
                layer |= {"mlp.experts.gate_up_proj": (E, 2 * I, H), "mlp.experts.down_proj": (E, H, I)}
            else:
                for e in range(E):
                    layer |= {
                        f"mlp.experts.{e}.gate_proj.weight": (I, H),
                        f"mlp.experts.{e}.up_proj.weight": (I, H),
                        f"mlp.experts.{e}.down_proj.weight": (H, I),
                    }
        shapes |= {p + k: v for k, v in layer.items()}
    return shapes


def load_weights(path: str | Path, cfg: HYV3Config, dtype: DType = DType.float32, progress=None) -> LoadedWeights:
    """Reads and validates every tensor, returning them under our names in `dtype`."""
    reader = CheckpointReader(path)
    names = {n for n in reader.names() if not _is_mtp(n, cfg)}
    naming = detect_naming(names)
    shapes = expected_shapes(cfg, naming)
    missing = sorted(set(shapes) - names)
    if missing:
        raise WeightError(f"{path}: missing tensor '{missing[0]}' (expected shape {list(shapes[missing[0]])})"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(names - set(shapes) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if extra:
        raise WeightError(f"{path}: unexpected tensor '{extra[0]}' (shape {list(reader.meta(extra[0])[1])})"
                          + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for name, shape in shapes.items():
        found = reader.meta(name)[1]
        if found != shape:
            raise WeightError(f"{path}: tensor '{name}': expected shape {list(shape)}, found {list(found)}")

    def get(name: str, as_dtype: DType = dtype) -> np.ndarray:
        return to_dtype(reader.read(name), as_dtype)

    out: dict[str, np.ndarray] = {"embed_tokens.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    out["lm_head.weight"] = out["embed_tokens.weight"] if cfg.tie_word_embeddings else get("lm_head.weight")
    ren = _RENAMES[naming]
    for i in range(cfg.num_hidden_layers):
        if progress:
            progress(i, cfg.num_hidden_layers)
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                  "self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            out[dst + n] = get(src + n)
        out[dst + "self_attn.qkv_proj.weight"] = np.concatenate(
            [get(f"{src}self_attn.{p}_proj.weight") for p in "qkv"], axis=0)
        if not cfg.is_sparse(i):
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[f"{dst}mlp.{n}.weight"] = get(f"{src}mlp.{n}.weight")
            continue
        out[dst + "mlp.router.weight"] = get(src + ren["mlp.router.weight"], DType.float32)
        out[dst + "mlp.expert_bias"] = get(src + ren["mlp.expert_bias"], DType.float32)
        if cfg.num_shared_experts:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[f"{dst}mlp.shared.{n}.weight"] = get(f"{src}{ren['mlp.shared.']}{n}.weight")
        out[dst + "mlp.experts.gate_up"], out[dst + "mlp.experts.down"] = _stack_experts(get, src, cfg, naming)
    return LoadedWeights(out, dtype, naming)


def _stack_experts(get, src: str, cfg: HYV3Config, naming: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer expert stacks [E, 2I, H] (gate rows, then up rows) and [E, H, I]."""
    if naming == "hf_fused":
        return get(src + "mlp.experts.gate_up_proj"), get(src + "mlp.experts.down_proj")
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    first = get(f"{src}mlp.experts.0.gate_proj.weight")
    gate_up = np.empty((E, 2 * I, cfg.hidden_size), first.dtype)
    down = np.empty((E, cfg.hidden_size, I), first.dtype)
    for e in range(E):
        p = f"{src}mlp.experts.{e}."
        gate_up[e, :I] = get(p + "gate_proj.weight")
        gate_up[e, I:] = get(p + "up_proj.weight")
        down[e] = get(p + "down_proj.weight")
    return gate_up, down


def _is_mtp(name: str, cfg: HYV3Config) -> bool:
    m = _LAYER_RE.match(name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers
