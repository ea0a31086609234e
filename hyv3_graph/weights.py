"""Checkpoint loading: safetensors (single file or sharded index), two namings, one rename table.

Our names (what the graph's `Weight`s are called), per layer under `layers.{i}.`:

    input_layernorm.weight, post_attention_layernorm.weight   [H]
    self_attn.qkv_proj.weight   [(Hq + 2 Hkv) D, H]   q, k, v rows concatenated (the prepared layout;
                                                       what MAX's fused_qkv_ragged_matmul reads)
    self_attn.o_proj.weight     [H, Hq D]
    self_attn.q_norm.weight, self_attn.k_norm.weight   [D]
    dense:  mlp.{gate,up}_proj.weight [I, H], mlp.down_proj.weight [H, I]
    sparse: mlp.router.weight [E, H] float32, mlp.expert_bias [E] float32 (always fp32: a bf16
            expert bias changes which experts win), mlp.shared.{gate,up}_proj.weight [S, H],
            mlp.shared.down_proj.weight [H, S] (S = moe_intermediate_size * num_shared_experts),
            mlp.experts.gate_up [E, 2I, H]  rows 0..I-1 = gate, I..2I-1 = up (HF's fused layout; the prepared
                                            layout stacks the raw naming's per-expert tensors into it)
            mlp.experts.down    [E, H, I]

plus `embed_tokens.weight` [V, H], `norm.weight` [H], `lm_head.weight` [V, H] (the embedding
when `tie_word_embeddings`). The MTP layer (`model.layers.{num_hidden_layers}.*`) is dropped.

Each shard's header is parsed once and checked against the file (`safetensors_io.read_safetensors_header`: a
truncated or corrupted shard is one `WeightError` naming the file and tensor). No weight is copied twice: tensors
in the model dtype are views of the memory-mapped shards and reach MAX as they are (MAX runs on the buffer it is
given); the two layout changes (fused qkv, stacked experts) are made once into files of their own
(`prepared.py`) and mapped the same way; only a dtype conversion allocates, and it is then the one copy.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from max.dtype import DType

from .config import HYV3Config
from . import q8_0
from .dtypes import to_dtype
from .safetensors_io import ST_DTYPES, TensorInfo, WeightError, read_safetensors_header


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
_FLOAT_DTYPES = ("F32", "F16", "BF16")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointReader:
    """The tensors of a safetensors checkpoint directory: each shard's header read once, data memory-mapped.

    `read` returns a view of the mapped file (no copy): bytes enter memory as the page cache, and only the dtype
    conversions the model asks for allocate. The maps are private copy-on-write (`mode="c"`), not read-only: MAX's
    `Buffer.from_numpy` copies a read-only array (measured: +1 GB of anonymous memory for a 1 GB weight) but wraps
    a writable one in place, and nothing writes to weights, so no page is ever copied."""

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
        """A view of the mapped tensor: float32/float16, or bf16 bits as uint16."""
        t = self.tensors[name]
        if t.dtype not in _FLOAT_DTYPES:
            raise WeightError(f"{t.file}: tensor '{name}': expected a float dtype (F32/F16/BF16), found {t.dtype}")
        if t.file not in self._maps:
            self._maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="c")
        raw = self._maps[t.file][t.offset:t.offset + t.nbytes]
        return raw.view(ST_DTYPES[t.dtype]).reshape(t.shape)

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


@dataclass
class LoadedWeights:
    tensors: dict[str, np.ndarray]  # our names -> arrays in the model dtype's numpy form (Q8_0: uint8 bytes)
    dtype: DType
    naming: str
    quant: str | None = None  # "q8_0": the matmul weights are Q8_0 (q8_0.is_quantized), the rest in `dtype`
    nbytes: int = 0  # bytes of all the weights the model reads, one copy
    mapped_bytes: int = 0  # of those, views of mapped files (checkpoint or prepared layout): no anonymous memory
    load_s: float = 0.0
    prepared: Path | None = None  # the prepared-layout folder, where one was needed


def load_weights(path: str | Path, cfg: HYV3Config, dtype: DType = DType.float32, progress=None,
                 check_finite: bool = False, prepared_root: Path | None = None, populate: bool = True,
                 quant: str | None = None, prepared_dtype: DType | None = None) -> LoadedWeights:
    """Validates the checkpoint and returns every weight under our names in `dtype`, without a second copy.

    - A tensor already in `dtype` and in our layout is a view of the memory-mapped shard (no copy at all).
    - A tensor whose layout differs (q/k/v fused, the raw layout's per-expert tensors stacked) comes from the
      prepared layout (`prepared.py`): converted once into files of their own, then mapped the same way.
    - A tensor in another dtype (a float32 checkpoint run in bf16, the fp32 router of a bf16 checkpoint) is
      converted in memory: that conversion is then its only copy.
    - quant="q8_0": the matmul weights (q8_0.is_quantized) are Q8_0: the prepared tensors (fused qkv, stacked
      experts: ~97% of Hy3's bytes) are prepared as Q8_0 bytes, from their values in `prepared_dtype` (the
      checkpoint's own), and mapped; the rest are quantized at load, a chunk at a time from the mapped tensor (the
      Q8_0 bytes are then their only copy, 34/32 bytes a weight).

    With `populate`, each layer's mapped bytes are faulted in as it is loaded (the first step would otherwise read
    the checkpoint from disk), and `progress(msg)` gets one line per layer with its GB/s. With `check_finite`, every
    tensor the model reads is first scanned for NaN/inf (one pass over all the bytes)."""
    from .prepared import PreparedLayout

    t_start = time.perf_counter()
    say = progress or (lambda msg: None)
    reader = CheckpointReader(path)
    naming = validate_checkpoint(reader, cfg, check_finite)
    if quant not in (None, "q8_0"):
        raise ValueError(f"unknown weight quantization {quant!r} (known: q8_0)")
    prepared = PreparedLayout.ensure(reader, cfg, naming, prepared_dtype or dtype, root=prepared_root, progress=say,
                                     quant=quant)
    out: dict[str, np.ndarray] = {}
    loaded = LoadedWeights(out, dtype, naming, quant=quant, prepared=prepared.folder)

    def get(name: str, as_dtype: DType | None = None) -> np.ndarray:
        """The tensor in as_dtype (default: the model dtype); quantized models convert in `take` instead."""
        a = reader.read(name)
        return a if as_dtype is None and quant else to_dtype(a, as_dtype or dtype)

    def take(group: dict[str, np.ndarray], what: str) -> None:
        t0 = time.perf_counter()
        if quant:
            group = {n: a if a.dtype == np.uint8 else q8_0.quantize(a) if q8_0.is_quantized(n) else to_dtype(a, dtype)
                     for n, a in group.items()}  # uint8: Q8_0 bytes from the prepared layout
        mapped = [a for a in group.values() if _is_mapped(a)]
        if populate:
            for a in mapped:
                populate_pages(a)
        dt = time.perf_counter() - t0
        nbytes = sum(a.nbytes for a in group.values())
        loaded.nbytes += nbytes
        loaded.mapped_bytes += sum(a.nbytes for a in mapped)
        out.update(group)
        say(f"loading weights: {what}: {nbytes / 1e9:.2f} GB in {dt:.1f}s ({nbytes / 1e9 / max(dt, 1e-9):.2f} GB/s)")

    top = {"embed_tokens.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        top["lm_head.weight"] = get("lm_head.weight")
    take(top, "embedding, final norm, lm_head")
    if cfg.tie_word_embeddings:
        if quant:  # the embedding stays float32; lm_head is its own Q8_0 copy
            take({"lm_head.weight": out["embed_tokens.weight"]}, "lm_head (tied, quantized)")
        else:
            out["lm_head.weight"] = out["embed_tokens.weight"]
    ren = _RENAMES[naming]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        layer = {dst + n: get(src + n) for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                                 "self_attn.o_proj.weight", "self_attn.q_norm.weight",
                                                 "self_attn.k_norm.weight")}
        if not cfg.is_sparse(i):
            layer |= {f"{dst}mlp.{n}.weight": get(f"{src}mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")}
        else:
            layer[dst + "mlp.router.weight"] = get(src + ren["mlp.router.weight"], DType.float32)
            layer[dst + "mlp.expert_bias"] = get(src + ren["mlp.expert_bias"], DType.float32)
            if cfg.num_shared_experts:
                layer |= {f"{dst}mlp.shared.{n}.weight": get(f"{src}{ren['mlp.shared.']}{n}.weight")
                          for n in ("gate_proj", "up_proj", "down_proj")}
            if naming == "hf_fused":
                layer[dst + "mlp.experts.gate_up"] = get(src + "mlp.experts.gate_up_proj")
                layer[dst + "mlp.experts.down"] = get(src + "mlp.experts.down_proj")
        layer |= {dst + n: a for n, a in prepared.layer(i).items()}
        take(layer, f"layer {i + 1}/{cfg.num_hidden_layers}")
    loaded.load_s = time.perf_counter() - t_start
    return loaded


def _is_mapped(a: np.ndarray) -> bool:
    """Whether `a` is a view of a mapped file (its memory is page cache, not the process's own)."""
    while a is not None:
        if isinstance(a, np.memmap) or isinstance(a, mmap.mmap):
            return True
        a = a.base
    return False


_MADV_POPULATE_READ = 22  # Linux 5.14+: fault a range in (page cache and page tables) in one call
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def populate_pages(a: np.ndarray) -> None:
    """Brings a mapped array's pages into memory now, at the disk's sequential read rate, rather than one fault at a
    time during the first step. Falls back to touching a byte per page where the kernel lacks MADV_POPULATE_READ."""
    if a.nbytes == 0:
        return
    page = mmap.PAGESIZE
    start = a.ctypes.data & ~(page - 1)
    if _libc.madvise(start, a.ctypes.data + a.nbytes - start, _MADV_POPULATE_READ) != 0:
        flat = a.reshape(-1).view(np.uint8)
        int(flat[::page].max())


def _is_mtp(name: str, cfg: HYV3Config) -> bool:
    m = _LAYER_RE.match(name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers
