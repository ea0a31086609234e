"""The prepared layout: the weights whose layout our graph reads differently from the checkpoint, converted once.

Two things differ, per layer:
- `self_attn.qkv_proj.weight` [(Hq + 2 Hkv) D, H]: q, k and v rows one after the other (one GEMM; the layout
  MAX's fused_qkv_ragged_matmul reads). ~1% of the bytes.
- `mlp.experts.gate_up` [E, 2I, H] and `mlp.experts.down` [E, H, I] for the raw naming, whose experts are 3 E
  tensors per layer (576 for Hy3) at scattered offsets of the shards. ~97% of the real model's bytes.

Why files and not arrays: stacking the real model's experts in memory is a second ~570 GB copy next to the page
cache of the shards it came from. Written once into files of our own and memory-mapped, they cost disk, not
memory, and every later load maps them in seconds. The conversion is per layer: each layer's file is written
aside, checked against the checkpoint tensor by tensor (`np.array_equal` on the file as written back), and only
then renamed into place, so a killed conversion resumes at the first layer without a file.

A q8_0 model (`quant="q8_0"`) prepares the same tensors as Q8_0 bytes (q8_0.py: uint8 [..., K / 32 * 34],
quantized one source tensor at a time and checked against a fresh quantization of it): the experts then cost
their int8 bytes once on disk and nothing in memory, where quantizing them at every load held all of them in
anonymous memory and took minutes. The other matmul weights (~3% of Hy3's bytes) are quantized at load.

Where: `$HYV3_CACHE/prepared/<checkpoint folder name>-<key>/layer-NNN.safetensors`, the key hashing the
checkpoint's resolved path, its shards' names, sizes and mtimes, the model dtype, the quantization and
`LAYOUT_VERSION`: a changed checkpoint, dtype or quantization gets a new folder (old ones are not pruned: delete
them by hand).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
from max.dtype import DType

from . import q8_0
from .config import HYV3Config
from .dtypes import to_dtype
from .safetensors_io import ST_DTYPES, WeightError, read_safetensors_header, st_dtype, write_safetensors

LAYOUT_VERSION = 1


class PreparedLayout:
    """The prepared tensors of one (checkpoint, dtype): `layer(i)` maps layer i's file and returns its arrays."""

    def __init__(self, folder: Path | None, specs: dict[int, list], dtype: DType, quant: str | None):
        self.folder = folder
        self._specs = specs  # layer -> [(our name, st dtype, shape, source checkpoint names)]
        self._dtype = dtype  # the source tensors are read in this dtype (then quantized, with quant)
        self._quant = quant

    @classmethod
    def ensure(cls, reader, cfg: HYV3Config, naming: str, dtype: DType, root: Path | None = None,
               progress=None, quant: str | None = None) -> "PreparedLayout":
        """Converts the layers whose file is missing (with progress and GB/s), after checking the disk has room.
        quant="q8_0": the tensors are Q8_0 bytes of their values in `dtype`."""
        from .checkpoints import cache_root

        say = progress or (lambda msg: None)
        np_dtype = np.float32 if dtype == DType.float32 else np.uint16
        specs = {i: _layer_specs(cfg, naming, i, st_dtype(np_dtype), quant) for i in range(cfg.num_hidden_layers)}
        key = hashlib.sha256(json.dumps([str(reader.path.resolve()), _shard_signature(reader), str(dtype),
                                         LAYOUT_VERSION] + ([quant] if quant else [])).encode()).hexdigest()[:12]
        folder = (root or cache_root() / "prepared") / f"{reader.path.resolve().name}-{key}"
        self = cls(folder, specs, dtype, quant)
        todo = [i for i in specs if not self._complete(i)]
        if not todo:
            return self
        need = sum(_nbytes(s) for i in todo for s in specs[i])
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if need > free:
            raise WeightError(f"preparing {reader.path} needs {need / 1e9:.1f} GB in {folder} (stacked experts, fused "
                              f"qkv) but the disk has {free / 1e9:.1f} GB free: set HYV3_CACHE to a larger disk")
        say(f"preparing the weight layout once ({len(todo)} layers, {need / 1e9:.2f} GB) into {folder}")
        for i in todo:
            t0 = time.perf_counter()
            nbytes = self._convert(reader, i)
            dt = time.perf_counter() - t0
            say(f"prepared layer {i + 1}/{cfg.num_hidden_layers}: {nbytes / 1e9:.2f} GB in {dt:.1f}s "
                f"({nbytes / 1e9 / max(dt, 1e-9):.2f} GB/s), verified against the checkpoint")
        return self

    def _path(self, i: int) -> Path:
        return self.folder / f"layer-{i:03d}.safetensors"

    def _complete(self, i: int) -> bool:
        """Layer i's file is there with exactly the expected tensors (a file is only renamed in once verified)."""
        f = self._path(i)
        if not f.exists():
            return False
        try:
            found = read_safetensors_header(f)
        except WeightError:
            return False
        return {n: (t.dtype, t.shape) for n, t in found.items()} == {n: (d, s) for n, d, s, _ in self._specs[i]}

    def _convert(self, reader, i: int) -> int:
        sources = {name: src for name, _, _, src in self._specs[i]}
        model_dtype, quant = self._dtype, self._quant

        def fill(name: str, view: np.ndarray) -> None:
            flat = view.reshape(-1, view.shape[-1])
            for rows, a in _source_rows(reader, sources[name], model_dtype, quant):
                flat[rows] = a

        f = self._path(i)
        write_safetensors(f, [(n, d, s) for n, d, s, _ in self._specs[i]], fill)
        try:
            for name, view in self.layer(i).items():  # the file as written, mapped afresh
                flat = view.reshape(-1, view.shape[-1])
                for rows, a in _source_rows(reader, sources[name], model_dtype, quant):
                    if not np.array_equal(flat[rows], a):
                        raise WeightError(f"{f}: tensor '{name}' differs from the checkpoint after writing it "
                                          f"(disk or memory fault?); the file was removed, run again")
        except BaseException:
            f.unlink(missing_ok=True)
            raise
        return sum(_nbytes(s) for s in self._specs[i])

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Our name -> array (a view of the mapped file) for layer i's prepared tensors."""
        if not self._specs[i]:
            return {}
        f = self._path(i)
        infos = read_safetensors_header(f)
        mm = np.memmap(f, dtype=np.uint8, mode="c")  # copy-on-write: see CheckpointReader for why not read-only
        out = {}
        for name, dtype, shape, _ in self._specs[i]:
            t = infos[name]
            out[name] = mm[t.offset:t.offset + t.nbytes].view(ST_DTYPES[dtype]).reshape(shape)
        return out


def _layer_specs(cfg: HYV3Config, naming: str, i: int, dtype: str, quant: str | None = None) -> list:
    """[(our name, dtype, shape, [checkpoint names whose rows it holds, in order])] for layer i; with quant, Q8_0
    bytes (the last dim K becomes K / 32 * 34)."""
    p, H = f"model.layers.{i}.", cfg.hidden_size

    def spec(name, shape, sources):
        if quant:
            return name, "U8", (*shape[:-1], q8_0.row_bytes(shape[-1])), sources
        return name, dtype, shape, sources

    specs = [spec("self_attn.qkv_proj.weight", (cfg.q_dim + 2 * cfg.kv_dim, H),
                  [f"{p}self_attn.{x}_proj.weight" for x in "qkv"])]
    if cfg.is_sparse(i) and naming == "raw":
        E, I = cfg.num_experts, cfg.moe_intermediate_size
        e = [f"{p}mlp.experts.{j}." for j in range(E)]
        specs += [spec("mlp.experts.gate_up", (E, 2 * I, H),
                       [x + y for x in e for y in ("gate_proj.weight", "up_proj.weight")]),
                  spec("mlp.experts.down", (E, H, I), [x + "down_proj.weight" for x in e])]
    return specs


def _source_rows(reader, names: list[str], dtype: DType, quant: str | None = None):
    """(row slice, tensor in `dtype`, or its Q8_0 bytes with quant) for the checkpoint tensors `names` stacked one
    after the other along rows: one tensor at a time, so converting or checking a layer never holds more than one
    expert's weights."""
    row = 0
    for name in names:
        a = to_dtype(reader.read(name), dtype)
        if quant:
            a = q8_0.quantize(a)
        yield slice(row, row + a.shape[0]), a
        row += a.shape[0]


def _nbytes(spec) -> int:
    _, dtype, shape, _ = spec
    return int(np.prod(shape)) * np.dtype(ST_DTYPES[dtype]).itemsize


def _shard_signature(reader) -> list:
    files = sorted({t.file for t in reader.tensors.values()})
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
