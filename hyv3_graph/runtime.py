"""Runtime: compile the graph once, then run ragged steps over the paged KV cache.

`HYV3Engine.step([(seq_id, new_token_ids), ...])` is one forward for a ragged batch: prefill
(many tokens), decode (one) and mixes of both, with sequences at different positions, all on
the same compiled model. Inputs are validated before anything is written, so a bad request
raises `RequestError` and leaves every other sequence's state untouched.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from max.driver import CPU as CPUDevice
from max.dtype import DType
from max.engine import InferenceSession

from .config import HYV3Config
from .dtypes import to_buffer
from .kv_cache import KVCacheError, PagedKVCache
from .model import HYV3Graph, Kernels
from .weights import LoadedWeights, load_weights


class RequestError(ValueError):
    """A request that cannot be served (bad token, empty prompt, no room in the cache)."""


class HYV3Engine:
    def __init__(self, model_path: str | Path, *, dtype: DType = DType.float32, kernels: str = "builtin",
                 max_batch_size: int = 8, max_length: int = 1024, page_size: int = 128,
                 total_pages: int | None = None, progress=None, session: InferenceSession | None = None):
        self.model_path = Path(model_path)
        self.cfg = HYV3Config.from_file(self.model_path)
        self.dtype = dtype
        self.kernels = Kernels(kernels)
        self.cache = PagedKVCache(self.cfg, dtype, max_batch_size=max_batch_size, max_length=max_length,
                                  page_size=page_size, total_pages=total_pages)
        self.graph = HYV3Graph(self.cfg, dtype, self.cache.params, n_positions=max_length, kernels=self.kernels)
        say = progress or (lambda msg: None)

        t0 = time.perf_counter()
        weights = load_weights(self.model_path, self.cfg, dtype,
                               progress=lambda i, n: say(f"loading weights: layer {i + 1}/{n}"))
        self.load_s = time.perf_counter() - t0
        say(f"weights loaded in {self.load_s:.1f}s; compiling the graph (minutes on a cold cache)")
        t0 = time.perf_counter()
        self.session = session or InferenceSession(devices=[CPUDevice()])
        self.model = self.session.load(self.graph.build(), weights_registry=self._registry(weights))
        self.compile_s = time.perf_counter() - t0

    def _registry(self, weights: LoadedWeights) -> dict:
        reg = {name: to_buffer(a, DType.float32 if a.dtype == np.float32 else self.dtype) for name, a in weights.tensors.items()}
        reg |= {name: to_buffer(a, DType.float32) for name, a in self.graph.extra_weights().items()}
        return reg

    # --- sequence lifecycle -------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        try:
            self.cache.claim(seq_id)
        except KVCacheError as e:
            raise RequestError(str(e)) from None

    def release(self, seq_id: int) -> None:
        self.cache.release(seq_id)

    def step(self, batch: list[tuple[int, list[int] | np.ndarray]]) -> np.ndarray:
        """New tokens for each claimed sequence -> float32 logits [B, V] of each one's last token."""
        if not batch:
            raise RequestError("empty batch")
        toks = []
        for seq_id, ids in batch:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if ids.size == 0:
                raise RequestError(f"sequence {seq_id}: no tokens (empty prompt?)")
            bad = ids[(ids < 0) | (ids >= self.cfg.vocab_size)]
            if bad.size:
                raise RequestError(f"sequence {seq_id}: token id {int(bad[0])} outside the vocab [0, {self.cfg.vocab_size})")
            toks.append(ids)
        steps = [(seq_id, len(t)) for (seq_id, _), t in zip(batch, toks)]
        try:
            self.cache.reserve(steps)
        except KVCacheError as e:
            raise RequestError(str(e)) from None
        offsets = np.zeros(len(toks) + 1, np.uint32)
        offsets[1:] = np.cumsum([len(t) for t in toks])
        out = self.model.execute(np.concatenate(toks), offsets, *self.cache.inputs(steps))
        self.cache.commit(steps)
        return out[0].to_numpy()
