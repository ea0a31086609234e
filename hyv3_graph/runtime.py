"""Runtime: compile the graph once, then run ragged steps over the paged KV cache.

`HYV3Engine.step([(seq_id, new_token_ids), ...])` is one forward for a ragged batch: prefill
(many tokens), decode (one) and mixes of both, with sequences at different positions, all on
the same compiled model. Inputs are validated before anything is written, so a bad request
raises `RequestError` and leaves every other sequence's state untouched.

Before anything is loaded or compiled, `memory_estimate` adds up weights, KV cache and activations and
`check_memory` compares them with the machine's MemAvailable: a model that cannot fit is one clear error
with the numbers, not an out-of-memory kill halfway through loading.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from max.driver import CPU as CPUDevice
from max.driver import Buffer
from max.dtype import DType
from max.engine import InferenceSession

from . import host_threads, q8_0
from .config import HYV3Config
from .dtypes import to_buffer
from .kv_cache import KVCacheError, PagedKVCache
from .model import HYV3Graph, Kernels
from .weights import CheckpointReader, LoadedWeights, expected_shapes, load_weights


class RequestError(ValueError):
    """A request that cannot be served (bad token, empty prompt, no room in the cache)."""


class MemoryCheckError(RequestError):
    """The model, its KV cache and activations would not fit in the memory available."""


def checkpoint_dtype(model_path: str | Path, cfg: HYV3Config) -> DType:
    """`--dtype auto`: the checkpoint's own dtype (config `dtype`/`torch_dtype`, else the tensors' majority by bytes).
    float16 checkpoints run in float32 (exact; the graph has no float16 path)."""
    name = cfg.torch_dtype
    if name is None:
        reader = CheckpointReader(model_path)
        by_dtype: dict[str, int] = {}
        for t in reader.tensors.values():
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        name = {"BF16": "bfloat16"}.get(max(by_dtype, key=by_dtype.get), "float32")
    return DType.bfloat16 if name == "bfloat16" else DType.float32


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes of the weights in the model dtype (router and bias fp32), one copy
    kv_cache: int
    activations: int  # the largest step: a full --max-length prefill, with temporaries counted twice

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def memory_estimate(cfg: HYV3Config, dtype: DType, *, max_batch_size: int, max_length: int, page_size: int,
                    total_pages: int | None = None, quant: str | None = None) -> MemoryEstimate:
    nbytes = 2 if dtype == DType.bfloat16 else 4
    weights = 0
    for name, shape in expected_shapes(cfg, "raw").items():
        fp32 = name.endswith(("router.gate.weight", "expert_bias"))
        per_weight = 4 if fp32 else q8_0.BLOCK_BYTES / q8_0.BLOCK if quant and len(shape) > 1 and (
            name.endswith("_proj.weight") or name == "lm_head.weight") else nbytes
        weights += int(int(np.prod(shape)) * per_weight)
    if quant and cfg.tie_word_embeddings:  # lm_head: a Q8_0 copy of the float32 embedding
        weights += cfg.vocab_size * q8_0.row_bytes(cfg.hidden_size)
    pages = total_pages if total_pages is not None else max_batch_size * -(-max_length // page_size)
    kv = (pages + 1) * 2 * cfg.num_hidden_layers * page_size * cfg.kv_dim * nbytes
    H, k = cfg.hidden_size, cfg.num_experts_per_tok
    per_token = 4 * (4 * H + cfg.q_dim + 2 * cfg.kv_dim + 2 * max(cfg.intermediate_size, cfg.shared_intermediate_size)
                     + k * (2 * cfg.moe_intermediate_size + H) + cfg.num_experts)
    activations = 2 * per_token * max_length + 4 * max_batch_size * cfg.vocab_size
    return MemoryEstimate(weights, kv, activations)


def mem_available() -> int | None:
    """The kernel's MemAvailable in bytes (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(est: MemoryEstimate, available: int | None) -> None:
    if available is None or est.total <= available:
        return
    gb = 1e9
    raise MemoryCheckError(
        f"this model needs ~{est.total / gb:.1f} GB (weights {est.weights / gb:.1f}, KV cache {est.kv_cache / gb:.1f}, "
        f"activations {est.activations / gb:.1f}) but {available / gb:.1f} GB is available: lower --max-length or "
        f"--max-batch-size (the KV cache), use --dtype bfloat16 (half the weights and cache), or pass "
        f"--skip-memory-check to try anyway")


def rss_anon() -> int:
    """This process's anonymous resident memory (RssAnon, bytes): what loading must keep near one copy of the
    weights. Mapped files' pages are RssFile, page cache the kernel can drop, and are not counted."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise OSError("no RssAnon in /proc/self/status")


class AnonPeak:
    """`with AnonPeak() as p:` samples `rss_anon` every `every_s` seconds while the body runs: `p.start`, `p.peak`
    (bytes). Linux keeps no high-water mark for anonymous memory alone (VmHWM counts mapped file pages too)."""

    def __init__(self, every_s: float = 0.02):
        self.every_s, self.start, self.peak = every_s, 0, 0
        self._done = threading.Event()

    def _sample(self):
        while not self._done.wait(self.every_s):
            self.peak = max(self.peak, rss_anon())

    def __enter__(self):
        self.start = self.peak = rss_anon()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


@contextmanager
def heartbeat(say, what: str, every_s: float = 5.0):
    """Calls `say` every `every_s` seconds with the elapsed time while the body runs (a MAX compile is minutes)."""
    done = threading.Event()
    t0 = time.perf_counter()

    def beat():
        while not done.wait(every_s):
            say(f"{what}: {time.perf_counter() - t0:.0f}s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class HYV3Engine:
    def __init__(self, model_path: str | Path, *, dtype: DType | None = None, kernels: str = "builtin",
                 max_batch_size: int = 8, max_length: int = 1024, page_size: int = 128,
                 total_pages: int | None = None, progress=None, session: InferenceSession | None = None,
                 check_memory_first: bool = True, check_finite_weights: bool = False, expert_stats: bool = False,
                 quant: str | None = None):
        """`dtype` None = the checkpoint's own (`checkpoint_dtype`). `quant` "q8_0": the matmul weights quantized to
        Q8_0 at load (hyv3_graph/q8_0.py), float32 activations and KV cache, --kernels custom only. `progress(msg)` receives loading and compiling
        messages, including a heartbeat every few seconds while MAX compiles. `expert_stats` (custom kernels):
        each step also records how many tokens each expert of each sparse layer took, in `last_expert_counts`."""
        self.model_path = Path(model_path)
        self.cfg = HYV3Config.from_file(self.model_path)
        for name, v in (("max_batch_size", max_batch_size), ("max_length", max_length), ("page_size", page_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RequestError(f"{name} must be a positive integer, got {v!r}")
        own_dtype = checkpoint_dtype(self.model_path, self.cfg) if dtype is None or quant else None
        self.dtype = dtype if dtype is not None else DType.float32 if quant else own_dtype
        self.kernels = Kernels(kernels)
        self.quant = quant
        if quant is not None:
            if quant != "q8_0":
                raise RequestError(f"unknown weight quantization {quant!r} (known: q8_0)")
            if not self.kernels.custom:
                raise RequestError("q8_0 weights run on our ops only: use --kernels custom")
            if self.dtype != DType.float32:
                raise RequestError("q8_0 weights run with float32 activations (dtype float32)")
            cfg = self.cfg
            for what, K in (("hidden_size", cfg.hidden_size), ("num_attention_heads * head_dim", cfg.q_dim),
                            ("intermediate_size", cfg.intermediate_size),
                            ("moe_intermediate_size", cfg.moe_intermediate_size)):
                if K % q8_0.BLOCK:
                    raise RequestError(f"q8_0: {what} = {K} is not a multiple of {q8_0.BLOCK} (Q8_0 blocks run "
                                       f"along each matmul's reduced dim)")
        self.memory = memory_estimate(self.cfg, self.dtype, max_batch_size=max_batch_size, max_length=max_length,
                                      page_size=page_size, total_pages=total_pages, quant=quant)
        if check_memory_first:
            check_memory(self.memory, mem_available())
        self.cache = PagedKVCache(self.cfg, self.dtype, max_batch_size=max_batch_size, max_length=max_length,
                                  page_size=page_size, total_pages=total_pages)
        if expert_stats and not self.kernels.custom:
            raise RequestError("expert stats come from our router op: they need --kernels custom")
        self.expert_stats = expert_stats
        self.sparse_layers = [i for i in range(self.cfg.num_hidden_layers) if self.cfg.is_sparse(i)]
        self.last_expert_counts: np.ndarray | None = None  # [n_sparse, E] of the last step, with expert_stats
        self.graph = HYV3Graph(self.cfg, self.dtype, self.cache.params, n_positions=max_length, kernels=self.kernels,
                               expert_stats=expert_stats, quant=quant)
        say = progress or (lambda msg: None)

        weights = load_weights(self.model_path, self.cfg, self.dtype, check_finite=check_finite_weights, progress=say,
                               quant=quant, prepared_dtype=own_dtype if quant else None)
        self.load_s, self.weight_bytes, self.mapped_weight_bytes = weights.load_s, weights.nbytes, weights.mapped_bytes
        self.prepared_files = sorted(weights.prepared.glob("layer-*.safetensors")) if weights.prepared else []
        say(f"weights loaded in {self.load_s:.1f}s ({weights.nbytes / 1e9:.2f} GB, {weights.mapped_bytes / 1e9:.2f} GB "
            f"of it mapped from files, not copied); compiling the graph (minutes on a cold cache)")
        t0 = time.perf_counter()
        self.session = session or InferenceSession(devices=[CPUDevice()])
        with heartbeat(say, "compiling"):
            self.model = self.session.load(self.graph.build(), weights_registry=self._registry(weights))
        self.compile_s = time.perf_counter() - t0
        say("warm-up: one step of one token")
        self._warm_up()

    def _warm_up(self) -> None:
        """One step of one token on a scratch sequence, released at once (the cache is empty: nothing else is
        touched). MAX's first execute in a process starts its log-flush poller, which is demoted here (20 ms, once per
        process: host_threads.py; a `small` decode step 9-12% faster on 2 cores), so that no step of the caller's is
        timed beside it or pays for finding it."""
        self.add_sequence(0)
        try:
            self.step([(0, [0])])
        finally:
            self.release(0)
            self.last_expert_counts = None
        host_threads.demote_busy_pollers_once()

    def _registry(self, weights: LoadedWeights) -> dict:
        reg = {name: to_buffer(a, DType.float32 if a.dtype == np.float32 else self.dtype) for name, a in weights.tensors.items()}
        reg |= {name: to_buffer(a, DType.float32) for name, a in self.graph.extra_weights().items()}
        return reg

    # --- sequence lifecycle -------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        _check_seq_id(seq_id)
        try:
            self.cache.claim(seq_id)
        except KVCacheError as e:
            raise RequestError(str(e)) from None

    def release(self, seq_id: int) -> None:
        _check_seq_id(seq_id)
        if not self.cache.holds(seq_id):
            raise RequestError(f"sequence {seq_id} is not in the cache (never added, or already released)")
        self.cache.release(seq_id)

    def step(self, batch: list[tuple[int, list[int] | np.ndarray]]) -> np.ndarray:
        """New tokens for each claimed sequence -> float32 logits [B, V] of each one's last token."""
        if not batch:
            raise RequestError("empty batch")
        toks, seen = [], set()
        for item in batch:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise RequestError(f"batch items are (seq_id, token_ids) pairs, got {item!r}")
            seq_id, ids = item
            _check_seq_id(seq_id)
            if seq_id in seen:
                raise RequestError(f"sequence {seq_id} appears twice in one step")
            seen.add(seq_id)
            if not self.cache.holds(seq_id):
                raise RequestError(f"sequence {seq_id} is not in the cache (add_sequence first; released ones are gone)")
            ids = np.asarray(ids).reshape(-1)
            if ids.size == 0:
                raise RequestError(f"sequence {seq_id}: no tokens (empty prompt?)")
            if ids.dtype.kind not in "iu":
                raise RequestError(f"sequence {seq_id}: token ids must be integers, got dtype {ids.dtype}")
            ids = ids.astype(np.int64)
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
        inputs = [np.concatenate(toks), offsets, *self.cache.inputs(steps)]
        # As Buffers: MAX's execute checks any other input against its DLPack protocol (a runtime-checkable
        # Protocol isinstance); for this step's eight small arrays that cost ~55 us a step (`tiny` decode 464 ->
        # 408 us, docs/perf-notes.md "linear streaming at M > 4").
        out = self.model.execute(*(a if isinstance(a, Buffer) else Buffer.from_numpy(a) for a in inputs))
        self.cache.commit(steps)
        if self.expert_stats and len(out) > 1:
            self.last_expert_counts = out[1].to_numpy()
        return out[0].to_numpy()


def _check_seq_id(seq_id) -> None:
    if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
        raise RequestError(f"sequence ids are integers, got {seq_id!r}")
