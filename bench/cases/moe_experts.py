"""`experts` cases: kernels/moe_experts.mojo vs HF's HYV3Experts eager loop (torch) vs MAX built-ins (dense).

Hy3 dimensions H = 4096, I = 1536, k = 8, with E = 32 experts (to fit in memory here), float32, for
T in {1, 8, 512, 2048}, plus bfloat16 weights for the same T (ours reads bf16; torch, the yardstick, the
same values in float32; at large T ours computes on bf16 pairs with vdpbf16ps where the CPU has it). Every implementation gets the same x, routing (ids, weights) and weights; the
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

from hyv3_graph.dtypes import bf16_bits_to_f32, f32_to_bf16_bits, to_buffer
from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.moe_experts import experts_builtin, moe_experts
from hyv3_graph.kernels.moe_router import moe_router_reference

from ..harness import Case, assert_close, run_case

BENCH = "experts"
FULL = dict(H=4096, I=1536, E=32, k=8, Ts=[1, 8, 512, 2048], bf16_Ts=[1, 8, 512, 2048])
QUICK = dict(H=256, I=128, E=16, k=4, Ts=[1, 64], bf16_Ts=[1, 64])
BF16_DOT_TOL = 1e-2  # relative to the output's scale; measured ~3e-3 at Hy3 sizes
MAX_DENSE_T = 512  # the dense built-in peer computes all E experts: past this it needs too much memory here


def _mojo_graph(session, H, I, E, k, wdt):
    cpu, f32, i32 = DeviceRef.CPU(), DType.float32, DType.int32
    with Graph(f"bench_moe_experts_{wdt}", input_types=[
            TensorType(f32, ["T", H], device=cpu), TensorType(f32, ["T", k], device=cpu),
            TensorType(i32, [E + 1], device=cpu), TensorType(i32, ["Tk"], device=cpu),
            TensorType(wdt, [E, 2 * I, H], device=cpu), TensorType(wdt, [E, H, I], device=cpu)],
            custom_extensions=[MOJO_KERNELS]) as g:
        g.output(moe_experts(*(v.tensor for v in g.inputs)))
    return session.load(g)


def _builtin_graph(session, H, I, E, k):
    cpu, f32 = DeviceRef.CPU(), DType.float32
    with Graph("bench_moe_experts_builtin", input_types=[
            TensorType(f32, ["T", H], device=cpu), TensorType(DType.int32, ["T", k], device=cpu),
            TensorType(f32, ["T", k], device=cpu), TensorType(f32, [E, 2 * I, H], device=cpu),
            TensorType(f32, [E, H, I], device=cpu)]) as g:
        g.output(experts_builtin(*(v.tensor for v in g.inputs)))
    return session.load(g)


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


def _case(torch, F, rng, T, E, k, H, I, run_mojo_weights, t_gu, t_dn, builtin, b_gu, b_dn, wname):
    x = rng.standard_normal((T, H), dtype=np.float32)
    ids, w, offsets, slots = moe_router_reference(rng.standard_normal((T, E)).astype(np.float32),
                                                  np.zeros(E, np.float32), k, 2.826)
    bx, bw, bo, bs, bi = (Buffer.from_numpy(a) for a in (x, w, offsets, slots, ids))
    tx, tids, tw = torch.from_numpy(x), torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(w)
    impls = {
        "mojo": lambda: run_mojo_weights(bx, bw, bo, bs),
        "torch": lambda: _torch_experts(torch, F, tx, tids, tw, t_gu, t_dn).numpy(),
    }
    if builtin is not None and T <= MAX_DENSE_T:
        impls["max"] = lambda: builtin.execute(bx, bi, bw, b_gu, b_dn)[0].to_numpy()

    # bf16 weights: experts with many rows round their activations to bf16 (the op's bf16-dot path)
    tol = BF16_DOT_TOL if wname == "bf16" else 2e-4

    def check(outputs):
        ref = outputs["torch"]
        for impl, o in outputs.items():
            assert_close(f"experts ({impl} vs torch)", o, ref, rtol=0, atol=tol * max(1.0, float(np.abs(ref).max())))

    active = len(np.unique(ids))
    wbytes = 2 if wname == "bf16" else 4
    return Case(
        bench=BENCH, name=f"T{T}_E{E}_k{k}_H{H}_I{I}_{wname}", impls=impls, check=check,
        flops=None if T <= 8 else 2.0 * T * k * 3 * H * I,
        bytes=active * 3 * H * I * wbytes if T <= 8 else None,
        versions={"mojo": f"kernels/moe_experts.mojo ({wname} weights)",
                  "torch": f"HF HYV3Experts loop, torch {torch.__version__}, float32 weights",
                  "max": f"max {version('max')} dense built-ins (all experts)"},
        notes="bf16 rows: ours reads bfloat16 weights, torch the same values in float32" if wname == "bf16" else "")


def cases(quick: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    s = QUICK if quick else FULL
    H, I, E, k = s["H"], s["I"], s["E"], s["k"]
    session = InferenceSession(devices=[CPU()])
    rng = np.random.default_rng(0)
    gate_up = (rng.standard_normal((E, 2 * I, H), dtype=np.float32) / np.sqrt(H)).astype(np.float32)
    down = (rng.standard_normal((E, H, I), dtype=np.float32) / np.sqrt(I)).astype(np.float32)
    out = []
    mojo, builtin = _mojo_graph(session, H, I, E, k, DType.float32), _builtin_graph(session, H, I, E, k)
    b_gu, b_dn = Buffer.from_numpy(gate_up), Buffer.from_numpy(down)
    t_gu, t_dn = torch.from_numpy(gate_up), torch.from_numpy(down)
    for T in s["Ts"]:
        out.append(_case(torch, F, rng, T, E, k, H, I, lambda *a: mojo.execute(*a, b_gu, b_dn)[0].to_numpy(),
                         t_gu, t_dn, builtin, b_gu, b_dn, "f32"))
    # bfloat16 weights (the real checkpoint's dtype): torch gets the same rounded values in float32
    gu16, dn16 = f32_to_bf16_bits(gate_up), f32_to_bf16_bits(down)
    mojo16 = _mojo_graph(session, H, I, E, k, DType.bfloat16)
    b_gu16, b_dn16 = to_buffer(gu16, DType.bfloat16), to_buffer(dn16, DType.bfloat16)
    t_gu32, t_dn32 = torch.from_numpy(bf16_bits_to_f32(gu16)), torch.from_numpy(bf16_bits_to_f32(dn16))
    for T in s["bf16_Ts"]:
        out.append(_case(torch, F, rng, T, E, k, H, I, lambda *a: mojo16.execute(*a, b_gu16, b_dn16)[0].to_numpy(),
                         t_gu32, t_dn32, None, None, None, "bf16"))
    return out


def results(quick: bool, machine: dict) -> list[dict]:
    return [row for case in cases(quick) for row in run_case(case, machine)]
