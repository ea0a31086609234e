"""Bench harness: run every implementation of a case on the same inputs, check they agree, then time each.

A case that times wrong answers is worthless, so disagreement fails the case loudly (and the run).
Compile time is never inside a timing: implementations are built before the case starts.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

IMPLS = ("mojo", "max", "torch", "numpy")


class Disagreement(AssertionError):
    """Two implementations of a case gave different answers."""


@dataclass
class Case:
    bench: str  # e.g. "router"
    name: str  # e.g. "T4096_E192_k8"
    impls: dict[str, Callable[[], Any]]  # impl -> zero-arg run on the prepared inputs
    check: Callable[[dict[str, Any]], None]  # raises Disagreement
    flops: float | None = None
    bytes: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    notes: str = ""


@dataclass
class Timing:
    median_s: float
    min_s: float
    repeats: int


def time_fn(fn: Callable[[], Any], min_time_s: float = 0.3, min_repeats: int = 5, max_repeats: int = 500,
            warmup: int = 2) -> Timing:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_repeats or (time.perf_counter() - start < min_time_s and len(samples) < max_repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), min(samples), len(samples))


def measure_machine(quick: bool) -> dict:
    """Roofline measured here and now: peak fp32 GEMM FLOP/s and streaming-read bandwidth, all cores."""
    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = time_fn(lambda: torch.mm(a, b), min_time_s=0.5)
    an, bn = a.numpy(), b.numpy()
    gemm_np = time_fn(lambda: an @ bn, min_time_s=0.5)
    peak = 2 * n**3 / min(gemm.min_s, gemm_np.min_s)
    big = torch.ones(512 * 2**20 // 4)  # float32 elements: far larger than any cache
    read = time_fn(lambda: big.sum(), min_time_s=0.5)
    bandwidth = big.numel() * 4 / read.min_s
    return {"peak_gflops": peak / 1e9, "bandwidth_gbs": bandwidth / 1e9, "cores": cores,
            "max_execute_overhead_us": _max_execute_overhead() * 1e6,
            "gemm": f"sgemm {n}^3 (best of torch {torch.__version__} / numpy {np.__version__})",
            "bandwidth_method": f"torch sum over {big.numel() * 4 >> 20} MiB, {cores} threads"}


def _max_execute_overhead() -> float:
    """Median time of executing a MAX graph that does nothing: the floor under every MAX/mojo row."""
    from max.driver import CPU, Buffer
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType

    with Graph("empty", input_types=[TensorType(DType.float32, ["n"], device=DeviceRef.CPU())]) as g:
        g.output(g.inputs[0].tensor)
    model = InferenceSession(devices=[CPU()]).load(g)
    x = Buffer.from_numpy(np.zeros(4, np.float32))
    return time_fn(lambda: model.execute(x)).median_s


def run_case(case: Case, machine: dict) -> list[dict]:
    outputs = {impl: fn() for impl, fn in case.impls.items()}
    case.check(outputs)  # raises Disagreement before anything is timed
    rows = []
    for impl, fn in case.impls.items():
        t = time_fn(fn)
        gflops = case.flops / t.median_s / 1e9 if case.flops else None
        gbs = case.bytes / t.median_s / 1e9 if case.bytes else None
        frac = None
        if gflops is not None:
            frac = gflops / machine["peak_gflops"]
        elif gbs is not None:
            frac = gbs / machine["bandwidth_gbs"]
        rows.append({"bench": case.bench, "case": case.name, "impl": impl, "median_s": t.median_s, "min_s": t.min_s,
                     "repeats": t.repeats, "gflops": gflops, "gbs": gbs, "roofline_frac": frac,
                     "version": case.versions.get(impl, ""), "agreed": True})
    ours = next((r for r in rows if r["impl"] == "mojo"), None)
    for r in rows:
        r["speedup_of_mojo"] = (r["median_s"] / ours["median_s"]) if ours else None
    return rows


def assert_close(name: str, got, expect, rtol: float, atol: float) -> None:
    try:
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(expect, np.float64), rtol=rtol, atol=atol)
    except AssertionError as e:
        raise Disagreement(f"{name}: {e}") from None
