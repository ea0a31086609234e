"""`e2e` cases: the whole model, ours (`--kernels custom` and `builtin`) vs HF `HYV3ForCausalLM` (torch).

Full run: the `small` preset in float32: prefill of one 512-token prompt, greedy decode of 128 tokens at
batch 1, and a ragged batch of 8 prompts of mixed lengths (greedy, 32 new tokens each). The `_bf16` cases run
the same in bfloat16 (weights, activations and KV cache), ours with `--kernels custom` against HF's bf16 model.
`--quick` runs the same on `tiny` with shapes that fit the test suite's engine settings, so CI reuses the
compiled graphs.

Every implementation gets the same prompts and is greedy; before timing, ours in float32 (both backends) must give
HF fp32's prefill logits and exactly its greedy tokens (bf16 is timed, its agreement is only reported).
Rooflines: prefill against its FLOPs over the measured peak, decode against the bytes one step must read
(active weights: attention, dense MLP, router, the k chosen and the shared experts, lm_head; plus the KV
cache) over the measured bandwidth.
"""

from __future__ import annotations

import statistics
import time
from importlib.metadata import version

import numpy as np

from max.dtype import DType

from hyv3_graph.checkpoints import embedded_checkpoint
from hyv3_graph.config import HYV3Config
from hyv3_graph.generate import generate
from hyv3_graph.runtime import HYV3Engine

from ..harness import Disagreement, assert_close

BENCH = "e2e"
FULL = dict(preset="small", max_length=1024, page_size=128, prefill=512, decode=128, ragged=[17, 300, 5, 128, 64, 1, 250, 33],
            ragged_new=32, repeats=3)
QUICK = dict(preset="tiny", max_length=256, page_size=16, prefill=128, decode=16, ragged=[17, 100, 5, 60], ragged_new=8,
             repeats=2)


def active_weight_bytes(cfg: HYV3Config, bytes_per: int) -> int:
    H, Ia, S = cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_intermediate_size
    total = cfg.vocab_size * H  # lm_head (the embedding reads one row)
    for i in range(cfg.num_hidden_layers):
        total += H * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * H
        if cfg.is_sparse(i):
            total += 3 * H * (Ia * cfg.num_experts_per_tok + S)
            total += cfg.num_experts * H * 4 // bytes_per  # fp32 router
        else:
            total += 3 * H * cfg.intermediate_size
    return total * bytes_per


def prefill_flops(cfg: HYV3Config, n: int) -> float:
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * n * n / 2  # causal QK^T and PV
    return 2 * n * active_weight_bytes(cfg, 1) + attn


def _median_min(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), min(times)


class _Ours:
    def __init__(self, engine: HYV3Engine):
        self.engine = engine

    def prefill_logits(self, prompt):
        self.engine.add_sequence(0)
        try:
            return self.engine.step([(0, prompt)])[0]
        finally:
            self.engine.release(0)

    def decode(self, prompt, n):
        out, stats = generate(self.engine, [prompt], max_new_tokens=n, ignore_eos=True)
        return out[0], stats["decode_s"]

    def batch(self, prompts, n):
        return generate(self.engine, prompts, max_new_tokens=n, ignore_eos=True)[0]


class _HF:
    def __init__(self, model, torch):
        self.model, self.torch = model, torch

    def prefill_logits(self, prompt):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([prompt])).logits[0, -1].float().numpy()

    def decode(self, prompt, n):
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor([prompt]), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            t0 = time.perf_counter()
            for _ in range(n - 1):  # HF eager decode with its KV cache
                out = self.model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            return tokens, time.perf_counter() - t0

    def batch(self, prompts, n):
        """The way an HF user batches: left padding + attention mask, greedy `generate`."""
        torch = self.torch
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)
        return [row[width:].tolist() for row in out]


def results(quick: bool, machine: dict) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    s = QUICK if quick else FULL
    path = embedded_checkpoint(s["preset"])
    cfg = HYV3Config.from_file(path)
    torch.set_num_threads(machine["cores"])
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, cfg.vocab_size, s["prefill"]).tolist()
    short = prompt[:16]
    ragged = [rng.integers(2, cfg.vocab_size, n).tolist() for n in s["ragged"]]
    common = dict(max_batch_size=len(ragged), max_length=s["max_length"], page_size=s["page_size"])
    impls = {  # a `_bf16` name runs the `_bf16` cases as its impl without the suffix
        "mojo": _Ours(HYV3Engine(path, kernels="custom", **common)),
        "max": _Ours(HYV3Engine(path, kernels="builtin", **common)),
        "torch": _HF(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), torch),
        "mojo_bf16": _Ours(HYV3Engine(path, dtype=DType.bfloat16, kernels="custom", **common)),
        "torch_bf16": _HF(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(), torch),
    }
    versions = {"mojo": "hyv3_graph --kernels custom", "max": f"hyv3_graph --kernels builtin (max {version('max')})",
                "torch": f"HF transformers {version('transformers')} fp32, torch {torch.__version__}",
                "mojo_bf16": "hyv3_graph --kernels custom, bf16",
                "torch_bf16": f"HF transformers {version('transformers')} bf16, torch {torch.__version__}"}

    # Agreement before any timing: ours vs HF fp32 logits and greedy tokens.
    ref_logits = impls["torch"].prefill_logits(prompt)
    ref_tokens, _ = impls["torch"].decode(short, s["decode"])
    agreement = {}
    for name, impl in impls.items():
        tokens, _ = impl.decode(short, s["decode"])
        agreement[name] = float(np.mean(np.array(tokens) == np.array(ref_tokens)))
        if name in ("mojo", "max"):
            assert_close(f"e2e prefill logits ({name})", impl.prefill_logits(prompt), ref_logits, rtol=0, atol=2e-3)
            if tokens != ref_tokens:
                raise Disagreement(f"e2e: {name} greedy tokens differ from HF fp32: {tokens} vs {ref_tokens}")

    rows = []
    for name, impl in impls.items():
        suffix, bytes_per = ("_bf16", 2) if name.endswith("_bf16") else ("", 4)
        kv_bytes = 2 * cfg.num_hidden_layers * cfg.kv_dim * bytes_per * (len(short) + s["decode"] // 2)
        decode_bytes = active_weight_bytes(cfg, bytes_per) + kv_bytes
        base = {"bench": BENCH, "impl": name.removesuffix("_bf16"), "version": versions[name], "agreed": True,
                "token_agreement_with_hf_fp32": agreement[name]}
        _, med, mn = _median_min(lambda: impl.prefill_logits(prompt), s["repeats"])
        fl = prefill_flops(cfg, len(prompt))
        rows.append(base | {"case": f"{s['preset']}_prefill{len(prompt)}{suffix}",
                            "median_s": med, "min_s": mn, "tok_s": len(prompt) / med, "gflops": fl / med / 1e9,
                            "gbs": None, "roofline_frac": fl / med / 1e9 / machine["peak_gflops"]})
        decode_times = [impl.decode(short, s["decode"])[1] for _ in range(s["repeats"])]
        med, mn = statistics.median(decode_times), min(decode_times)
        steps = s["decode"] - 1
        gbs = decode_bytes * steps / med / 1e9
        rows.append(base | {"case": f"{s['preset']}_decode{s['decode']}_b1{suffix}",
                            "median_s": med, "min_s": mn, "tok_s": steps / med, "gflops": None, "gbs": gbs,
                            "roofline_frac": gbs / machine["bandwidth_gbs"]})
        _, med, mn = _median_min(lambda: impl.batch(ragged, s["ragged_new"]), s["repeats"])
        n_tok = len(ragged) * s["ragged_new"]
        rows.append(base | {"case": f"{s['preset']}_ragged{len(ragged)}x{s['ragged_new']}{suffix}",
                            "median_s": med, "min_s": mn, "tok_s": n_tok / med, "gflops": None, "gbs": None,
                            "roofline_frac": None})
    ours = {r["case"]: r["median_s"] for r in rows if r["impl"] == "mojo"}
    for r in rows:
        r["speedup_of_mojo"] = r["median_s"] / ours[r["case"]]
    return rows
