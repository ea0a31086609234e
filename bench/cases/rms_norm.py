"""`rms_norm` cases: kernels/rms_norm.mojo's `add_rms_norm` (the residual add and the norm after it, one op) vs the
same math as MAX ops (`x + d`, then the norm's op chain: what `--kernels builtin` runs) vs torch (HF's HYV3RMSNorm
after the add) vs numpy (float32).

Shapes: Hy3's H 4096 at T 1 (a decode step: what the op saves is op launches, so the T 1 rows are mostly the cost of
a graph execute, which the machine line of the report measures alone) and T 512 (a prefill chunk: memory bound;
roofline on the bytes read and written). float32 and bfloat16. `--quick`: H 256 at T 1 and 64.
Check: every implementation's y within a bf16 ulp (bf16) or 1e-5 (float32) of ours, relative to the element.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from max.driver import CPU
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType

from hyv3_graph.dtypes import bf16_bits_to_f32, buffer_numpy, f32_to_bf16_bits, to_buffer
from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.rms_norm import add_rms_norm, rms_norm_builtin

from ..harness import Case, assert_close, run_case

BENCH = "rms_norm"
EPS = 1e-5
RTOL = {DType.float32: 1e-5, DType.bfloat16: 2.0 ** -7}


def _graph(session, dt, ours: bool):
    cpu = DeviceRef.CPU()
    rows = TensorType(dt, ["T", "H"], device=cpu)
    with Graph(f"bench_rms_norm_{dt}_{ours}", input_types=[rows, rows, TensorType(dt, ["H"], device=cpu)],
               custom_extensions=[MOJO_KERNELS]) as g:
        x, d, w = (v.tensor for v in g.inputs)
        if ours:
            g.output(*add_rms_norm(x, d, w, EPS))
        else:
            s = x + d
            g.output(s, rms_norm_builtin(s, w, EPS))
    return session.load(g)


def _values(a: np.ndarray, dt: DType) -> np.ndarray:
    return bf16_bits_to_f32(a) if dt == DType.bfloat16 else np.asarray(a, np.float32)


def cases(quick: bool) -> list[Case]:
    import torch

    session = InferenceSession(devices=[CPU()])
    H = 256 if quick else 4096
    out = []
    for dt in (DType.float32, DType.bfloat16):
        ours, builtin = _graph(session, dt, True), _graph(session, dt, False)
        bf16 = dt == DType.bfloat16
        tdt = torch.bfloat16 if bf16 else torch.float32
        for T in ([1, 64] if quick else [1, 512]):
            rng = np.random.default_rng(T)
            x, d = rng.standard_normal((2, T, H)).astype(np.float32)
            w = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
            if bf16:
                x, d, w = (f32_to_bf16_bits(a) for a in (x, d, w))
            bx, bd, bw = (to_buffer(a, dt) for a in (x, d, w))
            tx, td, tw = (torch.from_numpy(_values(a, dt)).to(tdt) for a in (x, d, w))
            xv, dv, wv = (_values(a, dt) for a in (x, d, w))

            def run_max(m, bx=bx, bd=bd, bw=bw, dt=dt):
                return _values(buffer_numpy(m.execute(bx, bd, bw)[1]), dt)

            def run_torch(tx=tx, td=td, tw=tw):
                with torch.no_grad():  # HF HYV3RMSNorm on the residual sum
                    s = tx + td
                    s32 = s.to(torch.float32)
                    s32 = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + EPS)
                    return (tw * s32.to(tdt)).to(torch.float32).numpy()

            impls = {"mojo": lambda m=ours: run_max(m), "max": lambda m=builtin: run_max(m), "torch": run_torch}
            if not bf16:
                def run_numpy(xv=xv, dv=dv, wv=wv):
                    s = xv + dv
                    return wv * (s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + np.float32(EPS)))
                impls["numpy"] = run_numpy

            def check(outputs, rtol=RTOL[dt]):
                """Every y within rtol of ours (bf16: one ulp of the normalized value, one of the product)."""
                ref = outputs["mojo"]
                for impl, y in outputs.items():
                    assert_close(f"rms_norm y ({impl})", y, ref, rtol=rtol, atol=1e-6)

            nbytes = (4 * T * H + H) * (2 if bf16 else 4)  # x, d read; s, y written; w
            out.append(Case(
                bench=BENCH, name=f"add_T{T}_H{H}_{'bf16' if bf16 else 'f32'}", impls=impls, check=check, bytes=nbytes,
                versions={"mojo": "kernels/rms_norm.mojo add_rms_norm (one op)",
                          "max": f"max {version('max')} op chain (add, cast, mul, mean, add, sqrt, div, cast, mul)",
                          "torch": f"torch {torch.__version__} (HF HYV3RMSNorm after the add)",
                          "numpy": f"numpy {np.__version__}"}))
    return out


def results(quick: bool, machine: dict) -> list[dict]:
    return [row for case in cases(quick) for row in run_case(case, machine)]
