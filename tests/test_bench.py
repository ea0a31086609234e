"""CI smoke test of `python -m bench --quick`: every bench produces rows, and every timed case's peers agreed."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.harness import IMPLS

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out)], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    m = data["machine"]
    assert m["peak_gflops"] > 0 and m["bandwidth_gbs"] > 0 and m["cores"] >= 1
    assert m["max_one_op_execute_us"] > 0 and m["max_execute_overhead_us"] > 0
    assert data["failed"] == []
    rows = data["results"]
    for r in rows:
        assert {"bench", "case", "impl", "median_s", "min_s", "gflops", "gbs", "roofline_frac"} <= r.keys()
        assert r["impl"] in IMPLS and r["agreed"] and r["median_s"] > 0
        if r["bench"] in ("router", "experts", "attention"):  # kernel cases: a roofline probe around their timings
            assert (r["local_roofline_frac"] is not None) == (r["gflops"] is not None or r["gbs"] is not None), r
    cases = {(r["bench"], r["case"], r["impl"]) for r in rows}
    for T in (1, 128):
        for impl in ("mojo", "max", "torch"):
            assert ("router", f"T{T}_E192_k8", impl) in cases
    assert {c for b, c, _ in cases if b == "compile"} == {"tiny_L4_cold", "tiny_L16_cold", "tiny_L16_warm"}
    for bench in ("experts", "attention", "e2e"):
        assert {i for b, _, i in cases if b == bench} >= {"mojo", "torch"}, bench
    assert any(b == "experts" and c.endswith("_bf16") for b, c, _ in cases)
    assert {c for b, c, _ in cases if b == "experts" and c.endswith("_grouped")} == {
        c + "_grouped" for b, c, _ in cases if b == "experts" and not c.endswith("_grouped")}  # HF's grouped_mm peer
    assert {c.rsplit("_", 1)[-1] for b, c, _ in cases if b == "attention"} == {"f32", "bf16"}
    assert (ROOT / "bench" / "results" / "latest-quick.md").exists()
