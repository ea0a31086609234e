"""`experts` cases: kernels/moe_experts.mojo vs HF's HYV3Experts eager loop (torch) vs MAX built-ins (dense).

Hy3 dimensions H = 4096, I = 1536, k = 8, with E = 32 experts (to fit in memory here), float32, for
T in {1, 8, 512, 2048}. Every implementation gets the same x, routing (ids, weights) and weights; the
dispatch metadata our op takes is the router's (computed once, outside the timing, as in the model).
Rooflines: FLOPs 2 * T * k * 3 * H * I over the peak; bytes = the active experts' weights (each read once).
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType

from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.moe_experts import experts_builtin, moe_experts
from hyv3_graph.kernels.moe_router import moe_router_reference

from ..harness import Case, assert_close, run_case

BENCH = "experts"
FULL = dict(H=4096, I=1536, E=32, k=8, Ts=[1, 8, 512, 2048])
QUICK = dict(H=256, I=128, E=16, k=4, Ts=[1, 64])
MAX_DENSE_T = 512  # the dense built-in peer computes all E experts: past this it needs too much memory here


def _graphs(session, H, I, E, k):
    cpu, f32, i32 = DeviceRef.CPU(), DType.float32, DType.int32
    x, w = TensorType(f32, ["T", H], device=cpu), TensorType(f32, ["T", k], device=cpu)
    gu, dn = TensorType(f32, [E, 2 * I, H], device=cpu), TensorType(f32, [E, H, I], device=cpu)
    with Graph("bench_moe_experts", input_types=[x, w, TensorType(i32, [E + 1], device=cpu),
                                                 TensorType(i32, ["Tk"], device=cpu), gu, dn],
               custom_extensions=[MOJO_KERNELS]) as g:
        g.output(moe_experts(*(v.tensor for v in g.inputs)))
    mojo = session.load(g)
    with Graph("bench_moe_experts_builtin", input_types=[x, TensorType(i32, ["T", k], device=cpu), w, gu, dn]) as g:
        g.output(experts_builtin(*(v.tensor for v in g.inputs)))
    return mojo, session.load(g)


def _torch_experts(torch, F, x, ids, w, gate_up, down):
    """HF HYV3Experts.forward (transformers 5.24), eager loop over the hit experts."""
    out = torch.zeros_like(x)
    mask = F.one_hot(ids, num_classes=gate_up.shape[0]).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        e = e[0]
        pos, tok = torch.where(mask[e])
        g, u = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(g) * u, down[e]) * w[tok, pos, None]
        out.index_add_(0, tok, y)
    return out


def cases(quick: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    s = QUICK if quick else FULL
    H, I, E, k = s["H"], s["I"], s["E"], s["k"]
    mojo, builtin = _graphs(InferenceSession(devices=[CPU()]), H, I, E, k)
    rng = np.random.default_rng(0)
    gate_up = (rng.standard_normal((E, 2 * I, H), dtype=np.float32) / np.sqrt(H)).astype(np.float32)
    down = (rng.standard_normal((E, H, I), dtype=np.float32) / np.sqrt(I)).astype(np.float32)
    b_gu, b_dn = Buffer.from_numpy(gate_up), Buffer.from_numpy(down)
    t_gu, t_dn = torch.from_numpy(gate_up), torch.from_numpy(down)
    out = []
    for T in s["Ts"]:
        x = rng.standard_normal((T, H), dtype=np.float32)
        ids, w, offsets, slots = moe_router_reference(rng.standard_normal((T, E)).astype(np.float32),
                                                      np.zeros(E, np.float32), k, 2.826)
        bx, bw, bo, bs, bi = (Buffer.from_numpy(a) for a in (x, w, offsets, slots, ids))
        tx, tids, tw = torch.from_numpy(x), torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(w)
        impls = {
            "mojo": lambda bx=bx, bw=bw, bo=bo, bs=bs: mojo.execute(bx, bw, bo, bs, b_gu, b_dn)[0].to_numpy(),
            "torch": lambda tx=tx, tids=tids, tw=tw: _torch_experts(torch, F, tx, tids, tw, t_gu, t_dn).numpy(),
        }
        if T <= MAX_DENSE_T:
            impls["max"] = lambda bx=bx, bi=bi, bw=bw: builtin.execute(bx, bi, bw, b_gu, b_dn)[0].to_numpy()

        def check(outputs):
            ref = outputs["torch"]
            for impl, o in outputs.items():
                assert_close(f"experts ({impl} vs torch)", o, ref, rtol=0, atol=2e-4 * max(1.0, float(np.abs(ref).max())))

        active = len(np.unique(ids))
        out.append(Case(
            bench=BENCH, name=f"T{T}_E{E}_k{k}_H{H}_I{I}_f32", impls=impls, check=check,
            flops=None if T <= 8 else 2.0 * T * k * 3 * H * I,
            bytes=active * 3 * H * I * 4 if T <= 8 else None,
            versions={"mojo": "kernels/moe_experts.mojo", "torch": f"HF HYV3Experts loop, torch {torch.__version__}",
                      "max": f"max {version('max')} dense built-ins (all experts)"}))
    return out


def results(quick: bool, machine: dict) -> list[dict]:
    return [row for case in cases(quick) for row in run_case(case, machine)]
