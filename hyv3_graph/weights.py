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

Each shard's header is parsed once and checked against the file (`read_safetensors_header`: a truncated
or corrupted shard is one `WeightError` naming the file and tensor); tensors are read-only views of the
memory-mapped shards, converted into the model dtype one at a time. Still copied today: the fused qkv
rows and the raw layout's per-expert tensors, stacked into [E, 2I, H] / [E, H, I].
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from max.dtype import DType

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
# safetensors dtype -> numpy dtype of the bytes (bf16 as its uint16 bit patterns: numpy has no bf16).
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
              "U8": np.uint8, "BOOL": np.bool_}
_FLOAT_DTYPES = ("F32", "F16", "BF16")
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_safetensors_header(f: Path) -> dict[str, TensorInfo]:
    """Parses one shard's header (once) and checks every entry against the file: a truncated or corrupted shard is
    one WeightError naming the file (and the tensor), never a library traceback later."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WeightError(f"{f}: not a safetensors file ({size} bytes, shorter than its 8-byte header size)")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise WeightError(f"{f}: header size {n} runs past the file ({size} bytes): truncated or not safetensors")
            raw = fh.read(n)
    except OSError as e:
        raise WeightError(f"{f}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightError(f"{f}: corrupted safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise WeightError(f"{f}: corrupted safetensors header (not a JSON object)")
    data_start, data_len = 8 + n, size - 8 - n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            ok = (dtype in _ST_DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise WeightError(f"{f}: tensor '{name}': malformed header entry {e!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dtype]).itemsize
        if end > data_len:
            raise WeightError(f"{f}: tensor '{name}': data [{begin}, {end}) runs past the end of the file's data "
                              f"({data_len} bytes): the shard is truncated")
        if end - begin != nbytes:
            raise WeightError(f"{f}: tensor '{name}': {end - begin} bytes of data for {dtype} {list(shape)} "
                              f"({nbytes} bytes)")
        out[name] = TensorInfo(f, dtype, shape, data_start + begin, nbytes)
    return out


class CheckpointReader:
    """The tensors of a safetensors checkpoint directory: each shard's header read once, data memory-mapped.

    `read` returns a read-only view of the mapped file (no copy): bytes enter memory as the page cache, and only the
    dtype conversions the model asks for allocate."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            shards = sorted({self.path / f for f in self._weight_map(index).values()})
            for f in shards:
                if not f.exists():
                    raise WeightError(f"{index}: names shard '{f.name}', which is not in {self.path}")
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise WeightError(f"{self.path}: no *.safetensors files and no model.safetensors.index.json")
        self.tensors: dict[str, TensorInfo] = {}
        for f in shards:
            self.tensors |= read_safetensors_header(f)
        if index.exists():
            for name, fname in self._weight_map(index).items():
                if name not in self.tensors or self.tensors[name].file.name != fname:
                    raise WeightError(f"{index}: tensor '{name}' is not in its shard '{fname}'")
        self._maps: dict[Path, np.memmap] = {}

    @staticmethod
    def _weight_map(index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values()):
                return weight_map
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            pass
        raise WeightError(f"{index}: not a valid index (a JSON object with a 'weight_map' of tensor -> file)")

    def names(self) -> set[str]:
        return set(self.tensors)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) without reading the data."""
        t = self.tensors[name]
        return t.dtype, t.shape

    def read(self, name: str) -> np.ndarray:
        """A read-only view of the mapped tensor: float32/float16, or bf16 bits as uint16."""
        t = self.tensors[name]
        if t.dtype not in _FLOAT_DTYPES:
            raise WeightError(f"{t.file}: tensor '{name}': expected a float dtype (F32/F16/BF16), found {t.dtype}")
        if t.file not in self._maps:
            self._maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="r")
        raw = self._maps[t.file][t.offset:t.offset + t.nbytes]
        return raw.view(_ST_DTYPES[t.dtype]).reshape(t.shape)

    def first_non_finite(self, names) -> tuple[str, int] | None:
        """(tensor, flat index) of the first NaN/inf among `names` in order, or None; reads every byte once."""
        for name in names:
            a = self.read(name)
            vals = a.reshape(-1)
            for lo in range(0, vals.size, 1 << 24):  # 16M elements at a time: bounded temporaries
                chunk = vals[lo:lo + (1 << 24)]
                bad = ((chunk & 0x7F80) == 0x7F80) if a.dtype == np.uint16 else ~np.isfinite(chunk)
                if bad.any():
                    return name, lo + int(np.argmax(bad))
        return None


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


def validate_checkpoint(reader: CheckpointReader, cfg: HYV3Config, check_finite: bool = False) -> str:
    """Every tensor the model reads is there, with a float dtype and its expected shape, and nothing unexpected
    (the MTP layer aside); with `check_finite`, none holds NaN/inf. Returns the checkpoint's naming."""
    names = {n for n in reader.names() if not _is_mtp(n, cfg)}
    naming = detect_naming(names)
    shapes = expected_shapes(cfg, naming)
    missing = sorted(set(shapes) - names)
    if missing:
        raise WeightError(f"{reader.path}: missing tensor '{missing[0]}' (expected shape {list(shapes[missing[0]])})"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(names - set(shapes) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if extra:
        raise WeightError(f"{reader.path}: unexpected tensor '{extra[0]}' (shape {list(reader.meta(extra[0])[1])})"
                          + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for name, shape in shapes.items():
        dt, found = reader.meta(name)
        if dt not in _FLOAT_DTYPES:
            raise WeightError(f"{reader.tensors[name].file}: tensor '{name}': expected a float dtype (F32/F16/BF16), "
                              f"found {dt}")
        if found != shape:
            raise WeightError(f"{reader.path}: tensor '{name}': expected shape {list(shape)}, found {list(found)}")
    if check_finite and (bad := reader.first_non_finite(sorted(shapes))):
        name, at = bad
        raise WeightError(f"{reader.tensors[name].file}: tensor '{name}': non-finite value (NaN/inf) at flat index "
                          f"{at} (index {list(np.unravel_index(at, reader.meta(name)[1]))})")
    return naming


def load_weights(path: str | Path, cfg: HYV3Config, dtype: DType = DType.float32, progress=None,
                 check_finite: bool = False) -> LoadedWeights:
    """Reads and validates every tensor, returning them under our names in `dtype`. With `check_finite`, every
    tensor the model reads is first scanned for NaN/inf (one pass over all the bytes)."""
    reader = CheckpointReader(path)
    naming = validate_checkpoint(reader, cfg, check_finite)

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
