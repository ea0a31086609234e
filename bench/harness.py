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

from hyv3_graph import host_threads

IMPLS = ("mojo", "max", "torch", "numpy", "llama.cpp")  # the `impl` of every row (the --json contract); a variant is a case


class Disagreement(AssertionError):
    """Two implementations of a case gave different answers."""


@dataclass
class Case:
    bench: str  # e.g. "router"
    name: str  # e.g. "T4096_E192_k8"
    impls: dict[str, Callable[[], Any]]  # impl -> zero-arg run on the prepared inputs
    check: Callable[[dict[str, Any]], None]  # raises Disagreement; its docstring says what it checks
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
    """Median and min of `fn`'s time, after the process's other threads went quiet (MAX's workers spin ~150 ms after
    an execute: hyv3_graph/host_threads.py)."""
    host_threads.wait_until_quiet()
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_repeats or (time.perf_counter() - start < min_time_s and len(samples) < max_repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), min(samples), len(samples))


def gemm_gflops(n: int) -> float:
    """Peak fp32 GEMM here and now: the best of torch's and numpy's n^3 sgemm, all cores."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    best = min(time_fn(lambda: torch.mm(a, b), min_time_s=0.5).min_s, time_fn(lambda: an @ bn, min_time_s=0.5).min_s)
    return 2 * n**3 / best / 1e9


READ_PROBE_BYTES = 512 << 20  # far larger than any cache


def read_gbs() -> float:
    """Streaming-read bandwidth here and now: torch's sum over READ_PROBE_BYTES, all cores."""
    import torch

    big = torch.ones(READ_PROBE_BYTES // 4)
    return READ_PROBE_BYTES / time_fn(lambda: big.sum(), min_time_s=0.5).min_s / 1e9


def measure_machine(quick: bool) -> dict:
    """Roofline measured at the start of the run: peak fp32 GEMM FLOP/s and streaming-read bandwidth, all cores."""
    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    n = 1024 if quick else 2048
    return {"peak_gflops": gemm_gflops(n), "bandwidth_gbs": read_gbs(), "cores": cores, "gemm_n": n,
            "max_execute_overhead_us": _max_execute_us(one_op=False), "max_one_op_execute_us": _max_execute_us(one_op=True),
            "busy_pollers_demoted": len(host_threads.demoted()),
            "gemm": f"sgemm {n}^3 (best of torch {torch.__version__} / numpy {np.__version__})",
            "bandwidth_method": f"torch sum over {READ_PROBE_BYTES >> 20} MiB, {cores} threads"}


def _max_execute_us(one_op: bool) -> float:
    """Median time of executing a MAX graph that does nothing (one_op False) or adds two [4] vectors: the floor under
    every MAX/mojo row. The one-op graph pays what any op pays (the kernel launch), the empty one does not."""
    from max.driver import CPU, Buffer
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType

    with Graph("one_op" if one_op else "empty",
               input_types=[TensorType(DType.float32, ["n"], device=DeviceRef.CPU())] * 2) as g:
        a, b = (v.tensor for v in g.inputs)
        g.output(a + b if one_op else a)
    model = InferenceSession(devices=[CPU()]).load(g)
    x = Buffer.from_numpy(np.zeros(4, np.float32))
    model.execute(x, x)  # the process's first execute starts MAX's log-flush thread: demote it before timing
    host_threads.demote_busy_pollers_once()
    return time_fn(lambda: model.execute(x, x)).median_s * 1e6


def run_case(case: Case, machine: dict) -> list[dict]:
    """Checks, then times every implementation. A case with FLOPs or bytes also runs its roofline probe just before
    and just after each implementation's timings, and counts the better of the two as that row's local roofline:
    this machine's read bandwidth moves by up to ~40% from one case to the next, so a fraction against the
    start-of-run probe alone mixes two machine states."""
    if unknown := set(case.impls) - set(IMPLS):
        raise ValueError(f"{case.bench} {case.name}: implementations {sorted(unknown)} are not among {IMPLS}")
    outputs = {impl: fn() for impl, fn in case.impls.items()}
    case.check(outputs)  # raises Disagreement before anything is timed: a row exists only if its output agreed
    check_desc = " ".join((case.check.__doc__ or case.check.__name__).split())
    probe = (lambda: gemm_gflops(machine["gemm_n"])) if case.flops else read_gbs if case.bytes else None
    timings, local = {}, {}
    for impl, fn in case.impls.items():
        before = probe() if probe else None
        timings[impl] = time_fn(fn)
        local[impl] = max(before, probe()) if probe else None
    rows = []
    for impl, t in timings.items():
        gflops = case.flops / t.median_s / 1e9 if case.flops else None
        gbs = case.bytes / t.median_s / 1e9 if case.bytes else None
        frac = None
        if gflops is not None:
            frac = gflops / machine["peak_gflops"]
        elif gbs is not None:
            frac = gbs / machine["bandwidth_gbs"]
        rows.append({"bench": case.bench, "case": case.name, "impl": impl, "median_s": t.median_s, "min_s": t.min_s,
                     "repeats": t.repeats, "gflops": gflops, "gbs": gbs, "roofline_frac": frac,
                     "local_roofline": local[impl],
                     "local_roofline_frac": (gflops or gbs) / local[impl] if local[impl] else None,
                     "version": case.versions.get(impl, ""), "agreed": True, "check": check_desc})
    ours = next((r for r in rows if r["impl"] == "mojo"), None)
    for r in rows:
        r["speedup_of_mojo"] = (r["median_s"] / ours["median_s"]) if ours else None
    return rows


def assert_close(name: str, got, expect, rtol: float, atol: float) -> None:
    try:
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(expect, np.float64), rtol=rtol, atol=atol)
    except AssertionError as e:
        raise Disagreement(f"{name}: {e}") from None
