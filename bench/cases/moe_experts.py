"""`experts` cases: kernels/moe_experts.mojo vs HF's HYV3Experts (torch) vs MAX built-ins (dense).

Hy3 dimensions H = 4096, I = 1536, k = 8, with E = 32 experts (to fit in memory here), float32, for
T in {1, 8, 512, 2048}, plus bfloat16 weights for the same T (ours reads bf16; at large T it computes on bf16
pairs with vdpbf16ps where the CPU has it), plus Q8_0 weights (`_q8_0` rows, hyv3_graph/q8_0.py, quantized from the
float32 weights) for T in {1, 8, 512}: ours reads the int8 blocks (at T 512 on the bf16-dot GEMM where the CPU has
AVX512_BF16, activations rounded to bf16 as for bf16 rows), the torch eager loop gets the dequantized values in
float32 (no peer has a CPU Q8_0 MoE; llama.cpp's q8_0 is in the e2e rows). Every implementation gets the same x,
routing (ids, weights) and weights; the dispatch metadata our op takes is the router's (computed once, outside the
timing, as in the model).
Two torch peers, both HF's own HYV3Experts module:
  * `<case>`: the eager per-expert loop, in float32 (for bf16 rows, the same rounded values in float32): the
    yardstick the experts issue sets its targets against;
  * `<case>_grouped`: HF's `grouped_mm` experts implementation (rows sorted by expert through two grouped GEMMs),
    which is what `from_pretrained` picks when torch has a grouped GEMM, as this torch does on the CPU; bf16 rows
    run it on bfloat16 weights and activations, as HF runs a bf16 checkpoint.
Rooflines: FLOPs 2 * T * k * 3 * H * I over the peak; bytes = the active experts' weights (each read once; Q8_0:
34 bytes per 32 weights).
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType

from hyv3_graph import q8_0
from hyv3_graph.dtypes import bf16_bits_to_f32, f32_to_bf16_bits, to_buffer
from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.moe_experts import (bf16_dot_experts, experts_builtin, int8_dot_experts, moe_experts,
                                          moe_experts_reference)
from hyv3_graph.kernels.moe_router import moe_router_reference

from ..harness import Case, assert_close, run_case

BENCH = "experts"
FULL = dict(H=4096, I=1536, E=32, k=8, Ts=[1, 8, 512, 2048], bf16_Ts=[1, 8, 512, 2048], q8_Ts=[1, 8, 512])
QUICK = dict(H=256, I=128, E=16, k=4, Ts=[1, 64], bf16_Ts=[1, 64], q8_Ts=[1, 64])
WEIGHT_BYTES = {"f32": 4.0, "bf16": 2.0, "q8_0": q8_0.BLOCK_BYTES / q8_0.BLOCK}
F32_TOL = 2e-4  # relative to the output's scale
BF16_DOT_TOL = 1e-2  # relative to the output's scale; measured ~3e-3 at Hy3 sizes
INT8_TOL = 1e-2  # ours on int8 activations vs the reference rounding them: one SwiGLU element may round a step
# the other way (the op's float32 sums against float64), each ~6e-4 of the output's scale at Hy3 sizes
GROUPED_BF16_TOL = 2e-2  # torch's bf16 path also rounds its intermediates and output: measured 4-6e-3 at both sizes
MAX_DENSE_T = 512  # the dense built-in peer computes all E experts: past this it needs too much memory here


def _mojo_graph(session, H, I, E, k, wdt):
    """Our op on weights of dtype wdt (uint8: Q8_0 rows of H or I weights)."""
    cpu, f32, i32 = DeviceRef.CPU(), DType.float32, DType.int32
    row_h, row_i = (q8_0.row_bytes(H), q8_0.row_bytes(I)) if wdt == DType.uint8 else (H, I)
    with Graph(f"bench_moe_experts_{wdt}", input_types=[
            TensorType(f32, ["T", H], device=cpu), TensorType(f32, ["T", k], device=cpu),
            TensorType(i32, [E + 1], device=cpu), TensorType(i32, ["Tk"], device=cpu),
            TensorType(wdt, [E, 2 * I, row_h], device=cpu), TensorType(wdt, [E, H, row_i], device=cpu)],
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


def _hf_experts(torch, H, I, E, k, implementation, gate_up, down):
    """HF's HYV3Experts (transformers 5.24) running `implementation` ("eager" or "grouped_mm") on these weights
    (shared, not copied)."""
    from transformers.models.hy_v3.configuration_hy_v3 import HYV3Config
    from transformers.models.hy_v3.modeling_hy_v3 import HYV3Experts

    config = HYV3Config(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    config._experts_implementation = implementation
    with torch.device("meta"):  # its own parameters would be replaced at once: do not allocate them
        experts = HYV3Experts(config).eval()
    experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return experts


def _grouped_gemm_name(torch) -> str:
    """Which grouped GEMM HF's grouped_mm experts call on this torch (transformers.integrations.moe._grouped_mm)."""
    from transformers.integrations.moe import _can_use_grouped_mm

    probe = torch.zeros(1, 8), torch.zeros(1, 8, 8), torch.ones(1, dtype=torch.int32)
    if not _can_use_grouped_mm(*probe):
        return "transformers' per-expert fallback loop"
    return "torch.nn.functional.grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "torch._grouped_mm"


def _cases(torch, rng, T, E, k, H, I, wname, run_mojo, eager, grouped, builtin, b_gu, b_dn) -> list[Case]:
    """The eager-loop case and its `_grouped` sibling (none when grouped is None) for one T and weight dtype (same
    inputs, ours timed in both)."""
    x = rng.standard_normal((T, H), dtype=np.float32)
    ids, w, offsets, slots = moe_router_reference(rng.standard_normal((T, E)).astype(np.float32),
                                                  np.zeros(E, np.float32), k, 2.826)
    bx, bw, bo, bs, bi = (Buffer.from_numpy(a) for a in (x, w, offsets, slots, ids))
    tx, tids, tw = torch.from_numpy(x), torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(w)

    def run_torch(experts, x_in):
        with torch.no_grad():
            return experts(x_in, tids, tw).float().numpy()

    def mojo():
        return run_mojo(bx, bw, bo, bs)

    eager_impls = {"mojo": mojo, "torch": lambda: run_torch(eager, tx)}
    if builtin is not None and T <= MAX_DENSE_T:
        eager_impls["max"] = lambda: builtin.execute(bx, bi, bw, b_gu, b_dn)[0].to_numpy()

    q8 = wname == "q8_0"
    int8 = int8_dot_experts(ids, E) if q8 else np.zeros(E, bool)
    q8_gemm = bf16_dot_experts(ids, E, H, I, q8=True) if q8 else np.zeros(E, bool)  # their activations in bf16
    # Q8_0 rows on vpdpbusd: ours rounds its activations to int8 blocks, so it is held to the float64 reference that
    # rounds them the same way (q8_0.quantize_activations; and to bf16 for any expert on the bf16-dot GEMM); torch
    # keeps the exact ones
    int8_ref = (moe_experts_reference(x, ids, w, eager.gate_up_proj.detach().numpy(), eager.down_proj.detach().numpy(),
                                      bf16_activations=q8_gemm, int8_activations=int8) if int8.any() else None)

    def check_against_torch(tol):
        def check(outputs):
            ref = outputs["torch"]
            for impl, o in outputs.items():
                if impl == "mojo" and int8_ref is not None:
                    assert_close("experts (mojo vs float64 on its int8 activations)", o, int8_ref, rtol=0,
                                 atol=INT8_TOL * max(1.0, float(np.abs(int8_ref).max())))
                else:
                    assert_close(f"experts ({impl} vs torch)", o, ref, rtol=0,
                                 atol=tol * max(1.0, float(np.abs(ref).max())))
        check.__doc__ = f"every implementation within {tol:g} x max(1, max|out|) of HF's torch experts" + (
            f" (ours on int8 activations: within {INT8_TOL:g} of the float64 reference that rounds them)"
            if int8_ref is not None else "")
        return check

    # bf16 weights, or Q8_0 where the bf16-dot GEMM runs: experts with many rows round their activations to bf16
    tol = BF16_DOT_TOL if wname == "bf16" or q8_gemm.any() else F32_TOL
    active = len(np.unique(ids))
    wbytes = WEIGHT_BYTES[wname]
    name = f"T{T}_E{E}_k{k}_H{H}_I{I}_{wname}"
    shared = dict(bench=BENCH, flops=None if T <= 8 else 2.0 * T * k * 3 * H * I,
                  bytes=active * 3 * H * I * wbytes if T <= 8 else None)
    mojo_version = f"kernels/moe_experts.mojo ({wname} weights)"
    eager_case = Case(
        name=name, impls=eager_impls, check=check_against_torch(tol), **shared,
        versions={"mojo": mojo_version, "torch": f"HF HYV3Experts eager loop, torch {torch.__version__}, float32 weights",
                  "max": f"max {version('max')} dense built-ins (all experts)"},
        notes=f"{wname} rows: ours reads {wname} weights, torch the same values in float32" if wname != "f32" else "")
    if grouped is None:
        return [eager_case]
    gx = tx.to(grouped.down_proj.dtype)  # a bf16 model's activations are bf16
    grouped_impls = {"mojo": mojo, "torch": lambda: run_torch(grouped, gx)}
    return [
        eager_case,
        Case(name=f"{name}_grouped", impls=grouped_impls, **shared,
             check=check_against_torch(GROUPED_BF16_TOL if wname == "bf16" else F32_TOL),
             versions={"mojo": mojo_version, "torch": f"HF HYV3Experts grouped_mm ({_grouped_gemm_name(torch)}), "
                                                      f"torch {torch.__version__}, {wname} weights and activations"}),
    ]


def cases(quick: bool) -> list[Case]:
    import torch

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
    eager, grouped = (_hf_experts(torch, H, I, E, k, impl, t_gu, t_dn) for impl in ("eager", "grouped_mm"))
    for T in s["Ts"]:
        out += _cases(torch, rng, T, E, k, H, I, "f32", lambda *a: mojo.execute(*a, b_gu, b_dn)[0].to_numpy(),
                      eager, grouped, builtin, b_gu, b_dn)
    # bfloat16 weights (the real checkpoint's dtype): the eager loop gets the same rounded values in float32
    gu16, dn16 = f32_to_bf16_bits(gate_up), f32_to_bf16_bits(down)
    mojo16 = _mojo_graph(session, H, I, E, k, DType.bfloat16)
    b_gu16, b_dn16 = to_buffer(gu16, DType.bfloat16), to_buffer(dn16, DType.bfloat16)
    t_gu32, t_dn32 = torch.from_numpy(bf16_bits_to_f32(gu16)), torch.from_numpy(bf16_bits_to_f32(dn16))
    eager16 = _hf_experts(torch, H, I, E, k, "eager", t_gu32, t_dn32)
    grouped16 = _hf_experts(torch, H, I, E, k, "grouped_mm", t_gu32.to(torch.bfloat16), t_dn32.to(torch.bfloat16))
    for T in s["bf16_Ts"]:
        out += _cases(torch, rng, T, E, k, H, I, "bf16", lambda *a: mojo16.execute(*a, b_gu16, b_dn16)[0].to_numpy(),
                      eager16, grouped16, None, None, None)
    # Q8_0 weights: ours streams the int8 blocks; the eager loop gets the dequantized values in float32
    gu8, dn8 = q8_0.quantize(gate_up), q8_0.quantize(down)
    mojo8 = _mojo_graph(session, H, I, E, k, DType.uint8)
    b_gu8, b_dn8 = Buffer.from_numpy(gu8), Buffer.from_numpy(dn8)
    eager8 = _hf_experts(torch, H, I, E, k, "eager", torch.from_numpy(q8_0.dequantize(gu8)),
                         torch.from_numpy(q8_0.dequantize(dn8)))
    for T in s["q8_Ts"]:
        out += _cases(torch, rng, T, E, k, H, I, "q8_0", lambda *a: mojo8.execute(*a, b_gu8, b_dn8)[0].to_numpy(),
                      eager8, None, None, None, None)
    return out


def results(quick: bool, machine: dict) -> list[dict]:
    return [row for case in cases(quick) for row in run_case(case, machine)]
