"""llama.cpp as a bench peer: its native `hy_v3` architecture through llama-cpp-python's low-level API.

The low-level API (not `Llama`) because the bench needs what `Llama` does not expose: the model's
`use_extra_bufts` (weight repacking; off for Q8_0 on CPUs with AMX, where GCC 12 builds segfault in
llama.cpp's AMX repack buffer), several sequences in one batch (the ragged case), and the logits of a step.
Greedy sampling is an argmax of those logits on the host, as ours does.

Settings (each row's `version` says which): the KV cache in f32 for f32 weights and in bf16 otherwise;
flash attention off (with it on, llama.cpp's CPU path casts K/V to f16: a 512-token prompt then leaves
HF fp32's greedy path after ~9 tokens); `n_threads` = the bench's cores; one `n_batch` = the longest prompt,
so a prefill is one decode call.
"""

from __future__ import annotations

import ctypes
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from hyv3_graph.kernels.cpu_isa import cpu_flags

INSTALL_HINT = "make bench-peers (builds llama-cpp-python==0.3.36 from source: ~4-6 minutes on 2 cores, once)"
GGML_TYPE_F32, GGML_TYPE_BF16 = 0, 30
KV_TYPE = {"f32": GGML_TYPE_F32, "bf16": GGML_TYPE_BF16, "q8_0": GGML_TYPE_BF16}


def available() -> tuple[bool, str]:
    """(importable, why not)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return False, f"llama-cpp-python is not importable ({e})"
    return True, ""


def cpu_has_amx() -> bool:
    return "amx_tile" in cpu_flags()


_QUIET = None


def _silence(L) -> None:
    """llama.cpp logs every load and context to stderr; the bench prints its own lines."""
    global _QUIET
    if _QUIET is None:
        _QUIET = L.llama_log_callback(lambda level, text, user_data: None)
        L.llama_log_set(_QUIET, ctypes.c_void_p(0))
        L.llama_backend_init()


class LlamaCpp:
    def __init__(self, gguf_path, weight_type: str, *, n_threads: int, n_ctx: int, n_seq_max: int, n_batch: int):
        import llama_cpp as L

        _silence(L)
        self.L, self.weight_type = L, weight_type
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.repack = not (weight_type == "q8_0" and cpu_has_amx())
        mp.use_extra_bufts = self.repack
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq_max
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.type_k = cp.type_v = KV_TYPE[weight_type]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {gguf_path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_batch, self.n_seq_max = n_batch, n_seq_max
        self.tokens = L.llama_batch_init(n_batch, 0, n_seq_max)  # the llama_batch every decode call fills
        self.settings = (f"llama.cpp (llama-cpp-python {_version()}) {weight_type} weights, "
                         f"KV {'f32' if KV_TYPE[weight_type] == GGML_TYPE_F32 else 'bf16'}, flash attention off, "
                         f"repack {'on' if self.repack else 'off'}, {n_threads} threads")

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.tokens)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits), at most n_batch of them."""
        b = self.tokens
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if (rc := self.L.llama_decode(self.ctx, b)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def _prefill(self, seq: int, prompt: list[int]) -> None:
        for lo in range(0, len(prompt), self.n_batch):
            chunk = prompt[lo:lo + self.n_batch]
            self._decode([(t, lo + j, seq, lo + j == len(prompt) - 1) for j, t in enumerate(chunk)])

    def prefill_logits(self, prompt: list[int]) -> np.ndarray:
        self._clear()
        self._prefill(0, prompt)
        return self._logits((len(prompt) - 1) % self.n_batch).copy()  # its row in the last chunk

    def decode(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        """Greedy: the prefill's token, then n - 1 single-token steps (timed)."""
        import time

        self._clear()
        self._prefill(0, prompt)
        tokens = [int(np.argmax(self._logits((len(prompt) - 1) % self.n_batch)))]
        t0 = time.perf_counter()
        for step in range(n - 1):
            self._decode([(tokens[-1], len(prompt) + step, 0, True)])
            tokens.append(int(np.argmax(self._logits(0))))
        return tokens, time.perf_counter() - t0

    def batch(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        """All prompts as sequences of one batch (prefill together, then decode all together), greedy."""
        assert len(prompts) <= self.n_seq_max and sum(map(len, prompts)) <= self.n_batch
        self._clear()
        items, rows = [], []
        for s, p in enumerate(prompts):
            items += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
            rows.append(len(items) - 1)
        self._decode(items)
        out = [[int(np.argmax(self._logits(r)))] for r in rows]
        for step in range(n - 1):
            self._decode([(o[-1], len(p) + step, s, True) for s, (p, o) in enumerate(zip(prompts, out))])
            for s, o in enumerate(out):
                o.append(int(np.argmax(self._logits(s))))
        return out


def _version() -> str:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "?"
