"""Paged KV cache in MAX's own layout, fed to MAX's (and our) ragged attention kernels.

Why not MAX's `PagedKVCacheManager`: it lives in `max.pipelines`, whose import needs the
`max[serve]` extra (av, fastapi, ... and transformers<5.13, which conflicts with the
transformers 5.24 that ships `hy_v3`). The graph side is MAX's: `MHAKVCacheParams` gives the
symbolic inputs and the kernels read exactly the buffers MAX's manager would build:

    kv_blocks      [total_pages + 1, 2, layers, page_size, n_kv_heads, head_dim]  (last page = null page)
    cache_lengths  [batch] uint32          tokens already cached per sequence
    lookup_table   [batch, cols] uint32    page ids per sequence, padded with the null page
    max_prompt_length, max_cache_length    [1] uint32
    page_stride    [1] int64               -1: pages are packed
    attention_dispatch_metadata [4] int64  (batch, max new tokens, partitions = 1 on CPU, max cache length)

Sequences claim a slot, reserve pages before each step (an error, not a crash, when the pool
is exhausted; nothing is changed then), commit the tokens written, and release on finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from max.driver import Buffer
from max.dtype import DType
from max.graph import DeviceRef
from max.nn.kv_cache import MHAKVCacheParams
from max.nn.kv_cache.utils import padded_lut_cols

from .config import HYV3Config


class KVCacheError(RuntimeError):
    """The request does not fit: batch slots, sequence capacity or pages exhausted."""


def kv_params(cfg: HYV3Config, dtype: DType, page_size: int) -> MHAKVCacheParams:
    return MHAKVCacheParams(dtype=dtype, n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                            num_layers=cfg.num_hidden_layers, page_size=page_size, devices=[DeviceRef.CPU()])


@dataclass
class _Sequence:
    length: int = 0  # tokens committed to the cache
    pages: list[int] = field(default_factory=list)


class PagedKVCache:
    def __init__(self, cfg: HYV3Config, dtype: DType, *, max_batch_size: int, max_length: int, page_size: int = 128,
                 total_pages: int | None = None):
        self.params = kv_params(cfg, dtype, page_size)
        self.page_size, self.max_batch_size, self.max_length = page_size, max_batch_size, max_length
        self.total_pages = total_pages if total_pages is not None else max_batch_size * -(-max_length // page_size)
        shape = (self.total_pages + 1, 2, cfg.num_hidden_layers, page_size, cfg.num_key_value_heads, cfg.head_dim)
        np_dtype = np.float32 if dtype == DType.float32 else np.uint16
        blocks = Buffer.from_numpy(np.zeros(shape, np_dtype))
        self.blocks = blocks if dtype == DType.float32 else blocks.view(DType.bfloat16)
        self._free = list(range(self.total_pages - 1, -1, -1))
        self._seqs: dict[int, _Sequence] = {}

    def claim(self, seq_id: int) -> None:
        if seq_id in self._seqs:
            raise KVCacheError(f"sequence {seq_id} is already in the cache")
        if len(self._seqs) >= self.max_batch_size:
            raise KVCacheError(f"batch capacity {self.max_batch_size} reached (--max-batch-size)")
        self._seqs[seq_id] = _Sequence()

    def release(self, seq_id: int) -> None:
        self._free.extend(reversed(self._seqs.pop(seq_id).pages))

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def length(self, seq_id: int) -> int:
        return self._seqs[seq_id].length

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def reserve(self, steps: list[tuple[int, int]]) -> None:
        """Allocates the pages for `n_new` more tokens of each (seq_id, n_new); all or nothing."""
        need = {}
        for seq_id, n_new in steps:
            s = self._seqs[seq_id]
            total = s.length + n_new
            if total > self.max_length:
                raise KVCacheError(f"sequence {seq_id} needs {total} cache positions, capacity is "
                                   f"{self.max_length} (--max-length)")
            need[seq_id] = max(0, -(-total // self.page_size) - len(s.pages))
        if sum(need.values()) > len(self._free):
            raise KVCacheError(f"KV pages exhausted: need {sum(need.values())}, {len(self._free)} free")
        for seq_id, n in need.items():
            self._seqs[seq_id].pages += [self._free.pop() for _ in range(n)]

    def commit(self, steps: list[tuple[int, int]]) -> None:
        for seq_id, n_new in steps:
            self._seqs[seq_id].length += n_new

    def inputs(self, steps: list[tuple[int, int]]) -> list:
        """The flattened graph inputs for one step over (seq_id, n_new) in batch order."""
        seqs = [self._seqs[s] for s, _ in steps]
        n_new = [n for _, n in steps]
        cache_lens = np.array([s.length for s in seqs], np.uint32)
        cols = padded_lut_cols(max([len(s.pages) for s in seqs] + [1]))
        lut = np.full((len(seqs), cols), self.total_pages, np.uint32)
        for b, s in enumerate(seqs):
            lut[b, : len(s.pages)] = s.pages
        max_new, max_cache = max(n_new, default=0), int(cache_lens.max(initial=0))
        return [self.blocks, cache_lens, lut, np.array([max_new], np.uint32), np.array([max_cache], np.uint32),
                np.array([-1], np.int64), np.array([len(seqs), max_new, 1, max_cache], np.int64)]
