"""`compile` cases: whole-model compile time of 4 vs 16 layers (same dims), cold cache, plus a warm reload, for
both backends under their own names (`mojo` = `--kernels custom`, `max` = `--kernels builtin`).

Subgraph-per-layer reuse should keep compile time flat in depth (16 layers <= ~1.3x of 4 layers).
Each compile runs in a fresh process with MODULAR_CACHE_DIR pointing at an empty folder, so
nothing is reused from earlier runs; the warm row reloads the graph from that cache. `--quick` times
4 layers cold and warm only (a cold compile is minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = "compile"
ROOT = Path(__file__).resolve().parents[2]


BACKENDS = {"mojo": "custom", "max": "builtin"}


def compile_once(layers: int, cache_dir: str, preset: str, kernels: str) -> float:
    code = (
        "import json, sys, tempfile, pathlib\n"
        "from hyv3_graph.checkpoints import PRESETS, hf_config_dict, random_tensors, write_checkpoint\n"
        "from hyv3_graph.runtime import HYV3Engine\n"
        f"spec = dict(PRESETS[{preset!r}], num_hidden_layers={layers})\n"
        "cfg = hf_config_dict(spec); path = pathlib.Path(tempfile.mkdtemp())\n"
        "write_checkpoint(path, cfg, random_tensors(cfg, 0))\n"
        f"e = HYV3Engine(path, kernels={kernels!r}, max_batch_size=1, max_length=256)\n"
        "print(json.dumps({'compile_s': e.compile_s}))\n"
    )
    env = dict(os.environ, MODULAR_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"compile of {layers} layers failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["compile_s"]


def results(quick: bool, machine: dict) -> list[dict]:
    """Not the timed-case loop: each number is one cold compile (minutes), not a repeatable call. No outputs to
    compare, so `agreed` is None and `check` says so."""
    preset = "tiny"
    plan = [("L4_cold", 4), ("L4_warm", 4)] if quick else [("L4_cold", 4), ("L16_cold", 16), ("L16_warm", 16)]
    rows = []
    for impl, kernels in BACKENDS.items():
        times = {}
        with tempfile.TemporaryDirectory() as cache4, tempfile.TemporaryDirectory() as cache16:
            for name, layers in plan:
                times[name] = compile_once(layers, cache4 if layers == 4 else cache16, preset, kernels)
        for name, t in times.items():
            rows.append({"bench": BENCH, "case": f"{preset}_{name}", "impl": impl, "median_s": t, "min_s": t,
                         "repeats": 1, "gflops": None, "gbs": None, "roofline_frac": None,
                         "version": f"hyv3_graph --kernels {kernels} (subgraph per layer kind)", "agreed": None,
                         "check": "none: a compile has no output to compare"})
        if "L16_cold" in times:
            rows[-2]["ratio_to_L4"] = times["L16_cold"] / times["L4_cold"]
    return rows
