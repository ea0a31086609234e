"""`router` cases: kernels/moe_router.mojo vs the same math as MAX built-in ops vs HF's HYV3TopKRouter in torch.

Inputs are router logits [T, E] (the fp32 router matmul is outside the op for every peer).
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType

from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.moe_router import moe_router, moe_router_builtin

from ..harness import Case, Disagreement, assert_close, run_case

BENCH = "router"
E, K, SCALE = 192, 8, 2.826  # Hy3's shape


def _graph(name, body):
    cpu = DeviceRef.CPU()
    with Graph(name, input_types=[TensorType(DType.float32, ["T", "E"], device=cpu),
                                  TensorType(DType.float32, ["E"], device=cpu)],
               custom_extensions=[MOJO_KERNELS]) as g:
        logits, bias = (v.tensor for v in g.inputs)
        g.output(*body(logits, bias)[:2])
    return g


def _torch_router(torch, logits, bias):
    """HF HYV3TopKRouter.forward after its matmul."""
    w = torch.sigmoid(logits)
    _, idx = torch.topk(w + bias, K, dim=-1, sorted=False)
    tw = w.gather(1, idx)
    tw = tw / (tw.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, tw * SCALE


def _check(outputs):
    """The same expert ids (as sets per token) and their weights within tolerance, for every implementation."""
    ref_ids, ref_w = None, None
    for impl, (ids, w) in outputs.items():
        ids, w = np.asarray(ids), np.asarray(w)
        order = np.argsort(ids, axis=1)  # peers order the k outputs differently: compare as sets
        ids, w = np.take_along_axis(ids, order, 1), np.take_along_axis(w, order, 1)
        if ref_ids is None:
            ref_ids, ref_w = ids, w
            continue
        if not np.array_equal(ids, ref_ids):
            raise Disagreement(f"router: {impl} chose different experts than {next(iter(outputs))}")
        assert_close(f"router weights ({impl})", w, ref_w, rtol=1e-5, atol=1e-6)


def cases(quick: bool) -> list[Case]:
    import torch

    session = InferenceSession(devices=[CPU()])
    mojo = session.load(_graph("bench_moe_router", lambda l, b: moe_router(l, b, K, SCALE, True)))
    builtin = session.load(_graph("bench_moe_router_builtin", lambda l, b: moe_router_builtin(l, b, K, SCALE, True)))
    rng = np.random.default_rng(0)
    bias = (0.05 * rng.standard_normal(E)).astype(np.float32)
    out = []
    for T in ([1, 128] if quick else [1, 128, 4096]):
        logits = rng.standard_normal((T, E)).astype(np.float32)
        tl, tb = torch.from_numpy(logits), torch.from_numpy(bias)
        bl, bb = Buffer.from_numpy(logits), Buffer.from_numpy(bias)  # MAX inputs, made once

        def run_mojo(m=mojo, l=bl):
            o = m.execute(l, bb)
            return o[0].to_numpy(), o[1].to_numpy()

        def run_max(m=builtin, l=bl):
            o = m.execute(l, bb)
            return o[0].to_numpy(), o[1].to_numpy()

        def run_torch(l=tl):
            with torch.no_grad():
                idx, w = _torch_router(torch, l, tb)
            return idx.numpy(), w.numpy()

        out.append(Case(
            bench=BENCH, name=f"T{T}_E{E}_k{K}", impls={"mojo": run_mojo, "max": run_max, "torch": run_torch},
            check=_check, bytes=T * E * 4 + E * 4 + T * K * 8,
            versions={"mojo": "kernels/moe_router.mojo", "max": f"max {version('max')} op chain",
                      "torch": f"torch {torch.__version__}"}))
    return out


def results(quick: bool, machine: dict) -> list[dict]:
    return [row for case in cases(quick) for row in run_case(case, machine)]
