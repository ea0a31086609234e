"""`real_slice` (rows under bench `e2e`): 2 layers of Hy3-preview at its exact dims (1 dense + 1 sparse, 192
experts, vocab 120832; `checkpoints.real_slice_checkpoint`), bf16, batch 1: prefill of 512 tokens, greedy
decode of 128; and the same in Q8_0 (`_q8_0` cases: ours `--dtype q8_0`, llama.cpp on the slice's q8_0 GGUF).

Per implementation: prefill and decode times; decode bytes per token (the active weights, as `e2e` counts them,
plus the KV cache) and their share of the read roofline, the run's start probe and (`local_roofline`) the same
probe run just before and after that row's decode timings, the better of the two; load time and peak anonymous
memory. Ours also gets
the projection to the full 80-layer model (1 dense + 79 sparse): per-token bytes, and tok/s at this machine's
measured bandwidth and at 400 GB/s (a 12-channel DDR5 server), if decode kept the slice's share of the roofline.

Load is timed from a cold page cache where the bench runs as root (`/proc/sys/vm/drop_caches`), next to the time
`cat` takes to read, cold too, the files that implementation loads (for ours the shards and the prepared layout,
whose weights it does not all read: the MTP layer, and the shards' experts, which it reads prepared); elsewhere
it is the warm figure and `load_cold` says so. Ours loads its weights before it compiles (`compile_s` apart).
Ours in q8_0 prepares its Q8_0 layout once (not timed as load when it is already there: run the bench twice for
the steady state).

Peers in the same run: llama.cpp on the slice's bf16 GGUF (written once next to the checkpoint by
`gguf_export`), and HF transformers bf16 where its copy of the weights fits in MemAvailable (the row is skipped
with a line saying so when it does not). Greedy tokens are reported against ours, not required: bf16 paths part
on random weights; q8_0 rows against ours in q8_0. `--quick` skips the case (~17.6 GB of checkpoint, ~10 GB of
weights used).
"""

from __future__ import annotations

import os
import subprocess
import time
from importlib.metadata import version

import numpy as np
from max.dtype import DType

from hyv3_graph.checkpoints import REAL_DIMS, hf_config_dict, real_slice_checkpoint
from hyv3_graph.config import HYV3Config
from hyv3_graph.runtime import AnonPeak, HYV3Engine, mem_available, memory_estimate

from .. import llama_cpp_peer
from ..harness import read_gbs
from .e2e import SUFFIX, WEIGHT_BYTES, _HF, _decode_s, _median_min, _Ours, active_weight_bytes, gguf_for, prefill_flops

BENCH = "real_slice"
PREFILL, DECODE, REPEATS = 512, 128, 2
FULL_LAYERS = 80
SERVER_GBS = 400.0


def _drop_page_cache() -> bool:
    if os.geteuid() != 0:
        return False
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    return True


def _cat_s(files) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def results(quick: bool, machine: dict) -> list[dict]:
    if quick:
        print("real_slice: skipped with --quick (a ~17.6 GB checkpoint)", flush=True)
        return []
    import torch

    path = real_slice_checkpoint(2, progress=print)
    cfg = HYV3Config.from_file(path)
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, cfg.vocab_size, PREFILL).tolist()
    short = prompt[:16]
    full = HYV3Config.from_dict(hf_config_dict(dict(REAL_DIMS, num_hidden_layers=FULL_LAYERS)))

    runners = {}  # (impl, weights) -> (make a runner, version, files its load reads)
    runners["mojo", "bf16"] = (lambda: _Ours(HYV3Engine(path, kernels="custom", max_batch_size=1, max_length=1024)),
                               "hyv3_graph --kernels custom, bf16, mapped weights", None)
    runners["mojo", "q8_0"] = (lambda: _Ours(HYV3Engine(path, kernels="custom", quant="q8_0", max_batch_size=1,
                                                        max_length=1024)),
                               "hyv3_graph --kernels custom --dtype q8_0 (float32 activations and KV cache), "
                               "mapped Q8_0 layout", None)
    ok, why = llama_cpp_peer.available()
    if ok:
        for wt in ("bf16", "q8_0"):
            gguf = gguf_for(path, wt)
            runners["llama.cpp", wt] = (
                lambda gguf=gguf, wt=wt: llama_cpp_peer.LlamaCpp(gguf, wt, n_threads=machine["cores"], n_batch=PREFILL,
                                                                 n_seq_max=1, n_ctx=1024), None, [gguf])
    else:
        print(f"real_slice: llama.cpp row skipped: {why}; install it with {llama_cpp_peer.INSTALL_HINT}", flush=True)
    hf_need = sum(f.stat().st_size for f in path.glob("*.safetensors"))  # HF materializes every tensor, MTP too
    avail = mem_available() or 0
    if hf_need < 0.9 * avail:
        from transformers import AutoModelForCausalLM

        runners["torch", "bf16"] = (lambda: _HF(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(), torch),
                            f"HF transformers {version('transformers')} bf16, torch {torch.__version__}", None)
    else:
        print(f"real_slice: HF transformers row skipped: it would hold {hf_need / 1e9:.1f} GB, "
              f"{avail / 1e9:.1f} GB is available", flush=True)

    weights_bytes = {wt: memory_estimate(cfg, DType.float32 if wt == "q8_0" else DType.bfloat16, max_batch_size=1,
                                         max_length=1024, page_size=128, quant=wt if wt == "q8_0" else None).weights
                     for wt in ("bf16", "q8_0")}
    rows, ours_tokens = [], {}
    for (impl, wt), (make, ver, files) in runners.items():
        kv_item = 4 if impl == "mojo" and wt == "q8_0" else 2  # ours q8_0: float32 KV; llama.cpp: bf16 KV
        kv_bytes = 2 * cfg.num_hidden_layers * cfg.kv_dim * kv_item * (len(short) + DECODE // 2)
        decode_bytes = active_weight_bytes(cfg, WEIGHT_BYTES[wt]) + kv_bytes
        full_bytes = active_weight_bytes(full, WEIGHT_BYTES[wt])
        cold = _drop_page_cache()
        with AnonPeak() as peak:
            t0 = time.perf_counter()
            try:
                runner = make()
            except RuntimeError as e:  # a peer that cannot load this checkpoint: its rows are skipped, ours kept
                print(f"real_slice: {impl} rows skipped: {e}", flush=True)
                continue
            load_s, compile_s = time.perf_counter() - t0, None
            _, pre_med, pre_min = _median_min(lambda: runner.prefill_logits(prompt), REPEATS)
            tokens, _ = runner.decode(short, DECODE)
        # the decode timings between two read probes (outside AnonPeak: the probe's buffer is not the runner's
        # memory): the machine's rate moves by up to 2x within minutes here, and the implementations are timed
        # minutes apart, so each row is also given as a share of the rate measured around its own timings
        before = read_gbs()
        times = [_decode_s(runner, short, DECODE) for _ in range(REPEATS)]
        local_gbs = max(before, read_gbs())
        if impl == "mojo":
            ours_tokens[wt] = tokens
            load_s, compile_s = runner.engine.load_s, runner.engine.compile_s  # weights alone; compile apart
            files = [*runner.engine.prepared_files, *sorted(path.glob("*.safetensors"))]
        if isinstance(runner, llama_cpp_peer.LlamaCpp):
            runner.close()
        ver = ver or runner.settings
        del runner  # before the next implementation loads its copy
        read_files = files or sorted(path.glob("*.safetensors"))
        cat_s = _cat_s(read_files) if cold and _drop_page_cache() else None
        cat_bytes = sum(f.stat().st_size for f in read_files)
        dec_med, dec_min = float(np.median(times)), min(times)
        steps = DECODE - 1
        gbs = decode_bytes * steps / dec_med / 1e9
        w_bytes = weights_bytes[wt]
        base = {"bench": "e2e", "impl": impl, "weights": wt, "version": ver, "agreed": None,
                "check": f"greedy tokens reported against ours in {wt}, not required (random weights)",
                "token_agreement_with_mojo": float(np.mean(np.array(tokens) == np.array(ours_tokens[wt]))),
                "load_s": load_s, "compile_s": compile_s, "load_cold": cold,
                "load_gbs": w_bytes / load_s / 1e9, "cat_files_gb": cat_bytes / 1e9, "cat_files_s": cat_s,
                "cat_gbs": cat_bytes / cat_s / 1e9 if cat_s else None,
                "peak_rss_anon_gb": peak.peak / 1e9, "peak_rss_anon_over_weights": peak.peak / w_bytes,
                "weights_gb": w_bytes / 1e9}
        fl = prefill_flops(cfg, PREFILL)
        rows.append(base | {"case": f"real_slice_prefill{PREFILL}{SUFFIX[wt]}", "median_s": pre_med, "min_s": pre_min,
                            "tok_s": PREFILL / pre_med, "gflops": fl / pre_med / 1e9, "gbs": None,
                            "roofline_frac": fl / pre_med / 1e9 / machine["peak_gflops"]})
        frac = gbs / machine["bandwidth_gbs"]
        row = base | {"case": f"real_slice_decode{DECODE}_b1{SUFFIX[wt]}", "median_s": dec_med, "min_s": dec_min,
                      "tok_s": steps / dec_med, "gflops": None, "gbs": gbs, "roofline_frac": frac,
                      "local_roofline": local_gbs, "local_roofline_frac": gbs / local_gbs,
                      "bytes_per_token": decode_bytes}
        if impl == "mojo":
            row |= {"full_model_bytes_per_token": full_bytes,
                    "full_model_tok_s_here": frac * machine["bandwidth_gbs"] * 1e9 / full_bytes,
                    f"full_model_tok_s_at_{SERVER_GBS:g}_gbs": frac * SERVER_GBS * 1e9 / full_bytes}
        rows.append(row)
    ours = {r["case"]: r["median_s"] for r in rows if r["impl"] == "mojo"}
    for r in rows:
        r["speedup_of_mojo"] = r["median_s"] / ours[r["case"]] if r["case"] in ours else None
    return rows
