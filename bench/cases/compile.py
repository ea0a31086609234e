"""`compile` cases: whole-model compile time of 4 vs 16 layers (same dims), cold cache, plus a warm reload.

Subgraph-per-layer reuse should keep compile time flat in depth (16 layers <= ~1.3x of 4 layers).
Each compile runs in a fresh process with MODULAR_CACHE_DIR pointing at an empty folder, so
nothing is reused from earlier runs; the warm row reloads the 16-layer graph from that cache.
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


def compile_once(layers: int, cache_dir: str, preset: str) -> float:
    code = (
        "import json, sys, tempfile, pathlib\n"
        "from hyv3_graph.checkpoints import PRESETS, hf_config_dict, random_tensors, write_checkpoint\n"
        "from hyv3_graph.runtime import HYV3Engine\n"
        f"spec = dict(PRESETS[{preset!r}], num_hidden_layers={layers})\n"
        "cfg = hf_config_dict(spec); path = pathlib.Path(tempfile.mkdtemp())\n"
        "write_checkpoint(path, cfg, random_tensors(cfg, 0))\n"
        "e = HYV3Engine(path, max_batch_size=1, max_length=256)\n"
        "print(json.dumps({'compile_s': e.compile_s}))\n"
    )
    env = dict(os.environ, MODULAR_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"compile of {layers} layers failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["compile_s"]


def results(quick: bool, machine: dict) -> list[dict]:
    """Not the timed-case loop: each number is one cold compile (minutes), not a repeatable call."""
    preset = "tiny"
    rows = []
    with tempfile.TemporaryDirectory() as cache4, tempfile.TemporaryDirectory() as cache16:
        t4 = compile_once(4, cache4, preset)
        t16 = compile_once(16, cache16, preset)
        warm16 = compile_once(16, cache16, preset)
    for name, t in [("L4_cold", t4), ("L16_cold", t16), ("L16_warm", warm16)]:
        rows.append({"bench": BENCH, "case": f"{preset}_{name}", "impl": "mojo", "median_s": t, "min_s": t,
                     "repeats": 1, "gflops": None, "gbs": None, "roofline_frac": None,
                     "version": "hyv3_graph (subgraph per layer kind)", "agreed": True})
    rows[1]["ratio_to_L4"] = t16 / t4
    return rows
