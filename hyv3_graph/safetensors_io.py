"""safetensors files without holding them in memory: a checked header parser and a streaming writer.

The format: 8 bytes of little-endian header size n, n bytes of JSON ({name: {dtype, shape, data_offsets}}, plus an
optional `__metadata__`), then the tensors' bytes, back to back (no holes). Both sides here work tensor by tensor:

- `read_safetensors_header` parses one shard's header once and checks every entry against the file's size, so a
  truncated or corrupted shard is one `WeightError` naming the file and tensor, never a library traceback later.
- `write_safetensors` writes a file of any size through a memory map, one tensor at a time, filled by a callback:
  the data never sits in anonymous memory (it goes out as page cache), so a 7 GB layer is written with a few MB
  of process memory. The header is padded with spaces so the data starts on a 64-byte boundary (the spec allows
  trailing spaces); tensors are then 64-byte aligned whenever the ones before them are multiples of 64 bytes,
  which every Hy3 weight is. The file appears under its name only once complete (written aside, then renamed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# safetensors dtype -> numpy dtype of the bytes (bf16 as its uint16 bit patterns: numpy has no bf16).
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
             "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
DATA_ALIGN = 64


class WeightError(ValueError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape or dtype; or a file is damaged."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_safetensors_header(f: Path) -> dict[str, TensorInfo]:
    """Parses one shard's header (once) and checks every entry against the file."""
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
            ok = (dtype in ST_DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise WeightError(f"{f}: tensor '{name}': malformed header entry {e!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_DTYPES[dtype]).itemsize
        if end > data_len:
            raise WeightError(f"{f}: tensor '{name}': data [{begin}, {end}) runs past the end of the file's data "
                              f"({data_len} bytes): the shard is truncated")
        if end - begin != nbytes:
            raise WeightError(f"{f}: tensor '{name}': {end - begin} bytes of data for {dtype} {list(shape)} "
                              f"({nbytes} bytes)")
        out[name] = TensorInfo(f, dtype, shape, data_start + begin, nbytes)
    return out


def st_dtype(a_dtype) -> str:
    """numpy dtype -> safetensors dtype string; uint16 means bf16 bits (the only uint16 tensors we write)."""
    a_dtype = np.dtype(a_dtype)
    if a_dtype == np.uint16:
        return "BF16"
    return next(k for k, v in ST_DTYPES.items() if np.dtype(v) == a_dtype and k != "U16")


def write_safetensors(path: Path, specs: list[tuple[str, str, tuple[int, ...]]],
                      fill: Callable[[str, np.ndarray], None], metadata: dict[str, str] | None = None) -> None:
    """Writes `specs` ([(name, safetensors dtype, shape)], in file order) to `path`: `fill(name, view)` writes each
    tensor's values into `view`, a writable numpy view of the mapped file ([shape], the dtype's numpy form).

    Written to `path.partial` and renamed when complete and flushed: a killed run leaves no file under `path`."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)
    data_start = 8 + len(raw)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(data_start + offset)
    if offset:
        mm = np.memmap(partial, dtype=np.uint8, mode="r+", offset=data_start, shape=(offset,))
        for name, dtype, shape in specs:
            begin, end = header[name]["data_offsets"]
            fill(name, mm[begin:end].view(ST_DTYPES[dtype]).reshape(shape))
        mm.flush()
        del mm
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    partial.rename(path)
