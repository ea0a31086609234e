"""`rms_norm` cases: kernels/rms_norm.mojo's `add_rms_norm` (the residual add and the norm after it, one op) vs the
same math as MAX ops (`x + d`, then the norm's op chain: what `--kernels builtin` runs) vs torch (HF's HYV3RMSNorm
after the add) vs numpy (float32).

Shapes: Hy3's H 4096 at T 1, as a chain of CHAIN ops in one graph (each op's residual sum and norm feed the next):
a decode step runs two norms a layer, and what the fused op saves there is MAX's op launches, which a single op per
graph would hide behind the graph execute's own cost; and T 512 (a prefill chunk, one op: memory bound, roofline on
the bytes read and written, which at this size include MAX's allocation of the outputs). float32 and bfloat16.
`--quick`: H 256 at T 1 (a chain) and 64.
Check: every implementation's y within two bf16 ulps (bf16) or 1e-5 (float32) of ours, relative to the element.
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
CHAIN = 16  # ops in one graph at T 1 (a decode step of `small` runs 16 norms)
RTOL = {DType.float32: 1e-5, DType.bfloat16: 2.0 ** -6}  # bf16: two ulps (the normalized value, the product)


def _graph(session, dt, ours: bool, chain: int):
    """chain x (s, y = x + d, norm(x + d)), each step's s and y the next one's x and d."""
    cpu = DeviceRef.CPU()
    rows = TensorType(dt, ["T", "H"], device=cpu)
    with Graph(f"bench_rms_norm_{dt}_{ours}_{chain}", input_types=[rows, rows, TensorType(dt, ["H"], device=cpu)],
               custom_extensions=[MOJO_KERNELS]) as g:
        x, d, w = (v.tensor for v in g.inputs)
        for _ in range(chain):
            if ours:
                x, d = add_rms_norm(x, d, w, EPS)
            else:
                x = x + d
                d = rms_norm_builtin(x, w, EPS)
        g.output(x, d)
    return session.load(g)


def _values(a: np.ndarray, dt: DType) -> np.ndarray:
    return bf16_bits_to_f32(a) if dt == DType.bfloat16 else np.asarray(a, np.float32)


def cases(quick: bool) -> list[Case]:
    import torch

    session = InferenceSession(devices=[CPU()])
    H = 256 if quick else 4096
    out = []
    for dt in (DType.float32, DType.bfloat16):
        bf16 = dt == DType.bfloat16
        tdt = torch.bfloat16 if bf16 else torch.float32
        for T in ([1, 64] if quick else [1, 512]):
            chain = CHAIN if T == 1 else 1
            ours, builtin = _graph(session, dt, True, chain), _graph(session, dt, False, chain)
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

            def run_torch(tx=tx, td=td, tw=tw, tdt=tdt, chain=chain):
                with torch.no_grad():  # HF HYV3RMSNorm on the residual sum
                    for _ in range(chain):
                        tx = tx + td
                        s32 = tx.to(torch.float32)
                        s32 = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + EPS)
                        td = tw * s32.to(tdt)
                    return td.to(torch.float32).numpy()

            impls = {"mojo": lambda m=ours, run=run_max: run(m), "max": lambda m=builtin, run=run_max: run(m),
                     "torch": run_torch}
            if not bf16:
                def run_numpy(xv=xv, dv=dv, wv=wv, chain=chain):
                    for _ in range(chain):
                        xv = xv + dv
                        dv = wv * (xv / np.sqrt(np.mean(xv * xv, axis=-1, keepdims=True) + np.float32(EPS)))
                    return dv
                impls["numpy"] = run_numpy

            def check(outputs, rtol=RTOL[dt]):
                """Every y within rtol of ours (bf16: an ulp of the normalized value, one of the product)."""
                ref = outputs["mojo"]
                for impl, y in outputs.items():
                    assert_close(f"rms_norm y ({impl})", y, ref, rtol=rtol, atol=1e-6)

            nbytes = chain * (4 * T * H + H) * (2 if bf16 else 4)  # per op: x, d read; s, y written; w
            out.append(Case(
                bench=BENCH, name=f"add{'_chain%d' % chain if chain > 1 else ''}_T{T}_H{H}_{'bf16' if bf16 else 'f32'}",
                impls=impls, check=check, bytes=nbytes,
                versions={"mojo": "kernels/rms_norm.mojo add_rms_norm (one op)",
                          "max": f"max {version('max')} op chain (add, cast, mul, mean, add, sqrt, div, cast, mul)",
                          "torch": f"torch {torch.__version__} (HF HYV3RMSNorm after the add)",
                          "numpy": f"numpy {np.__version__}"}))
    return out


def results(quick: bool, machine: dict) -> list[dict]:
    return [row for case in cases(quick) for row in run_case(case, machine)]
