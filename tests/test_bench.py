"""CI smoke test of `python -m bench --quick`: every bench produces rows, and every timed case's peers agreed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import llama_cpp_peer
from bench.harness import IMPLS, Case, Disagreement, assert_close, run_case
from hyv3_graph.kernels.cpu_isa import bf16_dot_available

ROOT = Path(__file__).resolve().parents[1]



@pytest.mark.slow
def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    m = data["machine"]
    assert m["peak_gflops"] > 0 and m["bandwidth_gbs"] > 0 and m["cores"] >= 1
    assert m["max_one_op_execute_us"] > 0 and m["max_execute_overhead_us"] > 0
    assert data["failed"] == []
    rows = data["results"]
    for r in rows:
        assert {"bench", "case", "impl", "median_s", "min_s", "gflops", "gbs", "roofline_frac", "check"} <= r.keys()
        assert r["impl"] in IMPLS and r["median_s"] > 0 and r["check"]
        if r["bench"] == "compile":
            assert r["agreed"] is None, r
        elif r.get("weights", "f32") == "f32":  # a float32 row exists only if it passed its check
            assert r["agreed"] is True, r
        else:  # bf16 / q8_0 e2e rows report theirs
            assert isinstance(r["agreed"], bool), r
        if r["bench"] in ("router", "experts", "attention", "linear", "rms_norm"):  # kernel cases: a roofline probe
            # around their timings
            assert (r["local_roofline_frac"] is not None) == (r["gflops"] is not None or r["gbs"] is not None), r
    cases = {(r["bench"], r["case"], r["impl"]) for r in rows}
    for T in (1, 128):
        for impl in ("mojo", "max", "torch"):
            assert ("router", f"T{T}_E192_k8", impl) in cases
    assert {(c, i) for b, c, i in cases if b == "compile"} == {(c, i) for c in ("tiny_L4_cold", "tiny_L4_warm")
                                                               for i in ("mojo", "max")}
    e2e = [r for r in rows if r["bench"] == "e2e"]
    for r in e2e:  # float32 rows: HF fp32's greedy tokens exactly, its logits within 2e-3 (bf16/q8_0: reported)
        if r["weights"] == "f32":
            assert r["token_agreement_with_hf_fp32"] == 1.0 and r["logits_max_err_vs_hf_fp32"] <= 2e-3, r
    if llama_cpp_peer.available()[0]:
        assert {r["weights"] for r in e2e if r["impl"] == "llama.cpp"} == {"f32", "bf16", "q8_0"}
    else:
        assert "e2e: llama.cpp rows skipped" in proc.stdout
    for bench in ("experts", "attention", "e2e"):
        assert {i for b, _, i in cases if b == bench} >= {"mojo", "torch"}, bench
    assert any(b == "experts" and c.endswith("_bf16") for b, c, _ in cases)
    assert {c for b, c, _ in cases if b == "experts" and c.endswith("_grouped")} == {  # HF's grouped_mm peer
        c + "_grouped" for b, c, _ in cases if b == "experts" and c.endswith(("_f32", "_bf16"))}
    experts_q8 = {(c, i) for b, c, i in cases if b == "experts" and c.endswith("_q8_0")}
    assert {c for c, _ in experts_q8} == {c.replace("_f32", "_q8_0") for b, c, _ in cases
                                           if b == "experts" and c.endswith("_f32")}  # every T, in Q8_0
    assert {i for _, i in experts_q8} == {"mojo", "torch"}
    assert {c.rsplit("_", 1)[-1] for b, c, _ in cases if b == "attention"} == {"f32", "bf16"}
    peaks = [r for r in rows if r["bench"] == "linear" and r["case"].startswith("stream_peak")]
    assert {r["case"].rsplit("_", 1)[-1] for r in peaks} == {"f32", "bf16", "0"}  # every weight format (q8_0)
    assert all(r["impl"] == "mojo" and r["gbs"] > 0 for r in peaks)
    linear = [r for r in rows if r["bench"] == "linear" and not r["case"].startswith("stream_peak")]
    streaming = [r for r in linear if r["impl"] == "mojo" and "_M1_" in r["case"]]  # against their format's ceiling
    assert streaming and all(r["stream_peak_frac"] == r["gbs"] / r["stream_peak_gbs"] for r in streaming)
    assert {r["impl"] for r in linear if r["case"].endswith("_f32")} == {"mojo", "max", "torch", "numpy"}
    assert {r["impl"] for r in linear if r["case"].endswith("_bf16")} == {"mojo", "max", "torch"}
    q8 = [r for r in linear if r["case"].endswith("_q8_0")]
    ours_f32 = [r for r in linear if r["case"].endswith("_f32") and r["impl"] == "mojo"]
    assert {r["impl"] for r in q8} == {"mojo", "numpy"} and len(q8) == 2 * len(ours_f32)  # every shape, in Q8_0
    assert any(r["case"].startswith("dot_peak") for r in linear) == bf16_dot_available()
    if bf16_dot_available():  # the bf16 GEMM rows against the micro-kernel's own peak
        assert all("dot_peak_frac" in r for r in linear if r["case"].endswith("_bf16") and r["gflops"])
    norms = {(c.rsplit("_", 1)[-1], i) for b, c, i in cases if b == "rms_norm"}
    assert norms == ({("f32", i) for i in ("mojo", "max", "torch", "numpy")}
                     | {("bf16", i) for i in ("mojo", "max", "torch")})
    assert any(b == "rms_norm" and c.startswith("add_chain") for b, c, _ in cases)  # the decode-shaped chain
    assert (ROOT / "bench" / "results" / "latest-quick.md").exists()


def test_a_case_that_disagrees_fails_before_timing():
    """`agreed` is not decoration: an implementation that is off makes the case raise, and no row is produced."""
    def check(outputs):
        """both within 1e-6"""
        assert_close("toy", outputs["numpy"], outputs["mojo"], rtol=0, atol=1e-6)

    good = Case("toy", "add", {"mojo": lambda: np.ones(3), "numpy": lambda: np.ones(3)}, check)
    rows = run_case(good, {"peak_gflops": 1.0, "bandwidth_gbs": 1.0, "gemm_n": 64})
    assert [r["agreed"] for r in rows] == [True, True] and rows[0]["check"] == "both within 1e-6"
    bad = Case("toy", "add", {"mojo": lambda: np.ones(3), "numpy": lambda: np.ones(3) + 1e-3}, check)
    with pytest.raises(Disagreement):
        run_case(bad, {"peak_gflops": 1.0, "bandwidth_gbs": 1.0, "gemm_n": 64})
