"""`linear` cases: kernels/linear.mojo vs MAX's matmul vs torch `F.linear` vs numpy, at the model's shapes.

Shapes (W [N, K]): Hy3's qkv 4096 -> 10240, o_proj 8192 -> 4096, the dense MLP's gate_up 4096 -> 2 x 13312 with
SwiGLU (`linear_swiglu`: gate and up as two [13312, 4096] tensors), its down 13312 -> 4096 and lm_head
4096 -> 120832; and the same five for the `small` preset (the e2e cases' model). M (rows of x) in {1, 8, 16, 512}:
decode, small batches (the streaming path; Q8_0 puts x's rows in the vector lanes from 6 rows), a prefill chunk;
lm_head only at M = 1, 8 and 16 (it runs on each sequence's last token).
float32 and bfloat16 (x, W and y in one dtype, as in the model). Peers at the same dtype: MAX's graph matmul
(`x @ transpose(W)`, what `--kernels builtin` runs), torch's F.linear (oneDNN; for SwiGLU two calls and
silu * up), numpy (float32 only).
`_q8_0` rows: Q8_0 weights (llama.cpp's int8 blocks, hyv3_graph/q8_0.py) quantized from the same float32 weights,
float32 x and y: our `linear_q8_0` / `linear_swiglu_q8_0` against numpy float32 on the dequantized weights (no
other peer has a CPU Q8_0 matmul op; llama.cpp's q8_0 is in the e2e rows). Their roofline counts the int8 bytes
(34 per 32 weights); compare with the `_f32` and `_bf16` rows of the same shape in the same run.
Check: every output within a tolerance of the float32 numpy result on the same values (bf16: widened), relative
to max |y|. Rooflines: M <= 16 against the weight bytes (each read once) over the measured bandwidth; M = 512
against 2 M N K FLOPs (two GEMMs for SwiGLU) over the measured fp32 GEMM peak.
Case `dot_peak` (where the CPU has AVX512_BF16): the bf16-dot micro-kernel alone on L1-resident operands, all
cores: the yardstick of the bf16 and Q8_0 M = 512 rows (both on that micro-kernel without AMX), whose
`dot_peak_frac` is their GFLOP/s over it.
Cases `stream_peak_<cores>cores_M{1,8,16}_..._{f32,bf16,q8_0}`: the streaming path's own ceiling
(`linear_stream_peak`): every core runs `linear`'s STREAM path over and over on weights of K 4096 sized to stay in
its L2 (~384 KiB), so weight bytes over time is the rate its loop consumes when memory keeps up (their `gbs`; the
read-bandwidth fraction of these rows means nothing). Our M 1, 8 and 16 rows carry `stream_peak_gbs` (that ceiling
for their weight format and M) and `stream_peak_frac`: a row near its read bandwidth is memory bound, one near
`stream_peak_gbs` is bound by the loop (at M 8 the dots run once per activation row on each weight byte, so the
ceiling falls with M; Q8_0's lanes from 6 rows cost the same at 6 as at 8 (ymm) and at 9 as at 16 (zmm)).
`--quick`: `tiny`'s shapes at M in {1, 64}; the `stream_peak` cases at M 1 on K 256.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType

from hyv3_graph import q8_0
from hyv3_graph.dtypes import bf16_bits_to_f32, bf16_rounded, buffer_numpy, f32_to_bf16_bits, to_buffer, to_dtype
from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.cpu_isa import bf16_dot_available
from hyv3_graph.kernels.linear import (DOT_TILE_FLOPS, INT8_X_PATHS, STREAM_MAX_M, linear, linear_builtin,
                                       linear_dot_peak, linear_path, linear_stream_peak, linear_swiglu,
                                       linear_swiglu_builtin)

from ..harness import Case, assert_close, run_case

BENCH = "linear"
DECODE_MS = (1, 8, 16)  # rows of the streaming cases (decode, small batches): judged on their weight bytes


def _shapes(H, q, kv, I, V):
    """name -> (N, K, swiglu, Ms) for a model with hidden H, q/kv projection widths, dense width I, vocab V."""
    Ms = (*DECODE_MS, 512)
    return {"qkv": (q + 2 * kv, H, False, Ms), "o_proj": (H, q, False, Ms), "gate_up": (I, H, True, Ms),
            "down": (H, I, False, Ms), "lm_head": (V, H, False, DECODE_MS)}


FULL = {"hy3": _shapes(4096, 8192, 1024, 13312, 120832), "small": _shapes(1024, 1024, 256, 2048, 32000)}
QUICK = {"tiny": {name: (N, K, sw, (1, 64)) for name, (N, K, sw, _) in _shapes(256, 256, 64, 512, 1024).items()}}
TOL = {DType.float32: 1e-4, DType.bfloat16: 8e-3}  # x max|y|; bf16: one output rounding (2^-9) plus float32 sums
# The peers' bf16 SwiGLU is three ops, each rounding to bf16 (gate, up, silu(gate), the product): measured 0.9%
# off at an element near max|y| (MAX, `small` gate_up M 8), so their bf16 SwiGLU rows get this tolerance.
PEER_BF16_SWIGLU_TOL = 2e-2


def _graph(session, dt, swiglu: bool, ours: bool):
    cpu = DeviceRef.CPU()
    types = [TensorType(dt, ["M", "K"], device=cpu), TensorType(dt, ["N", "K"], device=cpu)]
    if swiglu:
        types.append(TensorType(dt, ["N", "K"], device=cpu))
    with Graph(f"bench_linear_{'mojo' if ours else 'max'}_{'swiglu' if swiglu else 'plain'}_{dt}", input_types=types,
               custom_extensions=[MOJO_KERNELS] if ours else []) as g:
        args = [v.tensor for v in g.inputs]
        if swiglu:
            g.output((linear_swiglu if ours else linear_swiglu_builtin)(*args))
        else:
            g.output((linear if ours else linear_builtin)(*args))
    return session.load(g)


def _q8_graph(session, swiglu: bool):
    cpu = DeviceRef.CPU()
    types = [TensorType(DType.float32, ["M", "K"], device=cpu), TensorType(DType.uint8, ["N", "KQ"], device=cpu)]
    if swiglu:
        types.append(TensorType(DType.uint8, ["N", "KQ"], device=cpu))
    with Graph(f"bench_linear_mojo_{'swiglu' if swiglu else 'plain'}_q8_0", input_types=types,
               custom_extensions=[MOJO_KERNELS]) as g:
        g.output((linear_swiglu if swiglu else linear)(*(v.tensor for v in g.inputs)))
    return session.load(g)


def _q8_case(models, rng, model, name, N, K, swiglu, M) -> Case:
    """Q8_0 weights, float32 x and y: ours against numpy on the dequantized weights."""
    quantized = [q8_0.quantize(rng.standard_normal((N, K), dtype=np.float32) / np.float32(np.sqrt(K)))
                 for _ in range(2 if swiglu else 1)]
    weights = [q8_0.dequantize(q) for q in quantized]
    x = rng.standard_normal((M, K), dtype=np.float32)
    bufs = [Buffer.from_numpy(a) for a in (x, *quantized)]
    ours = models["mojo", swiglu, "q8_0"]

    def run_numpy(xs=x):
        y = xs @ weights[0].T
        return y / (1 + np.exp(-y)) * (xs @ weights[1].T) if swiglu else y

    ref = run_numpy()
    path = linear_path(M, K, False, q8=True)
    # ours takes x's int8 blocks (vnni, lanes) or x rounded to bf16 (dot): so does its reference
    x_ours = (q8_0.quantize_activations(x).astype(np.float32) if path in INT8_X_PATHS
              else bf16_rounded(x) if path == "dot" else None)
    ours_ref = ref if x_ours is None else run_numpy(x_ours)
    tol = TOL[DType.float32]

    def check(outputs):
        assert_close("linear q8_0 (numpy float32, dequantized)", outputs["numpy"], ref, rtol=0,
                     atol=tol * max(1.0, float(np.abs(ref).max())))
        assert_close("linear q8_0 (mojo vs numpy float32, dequantized)", outputs["mojo"], ours_ref, rtol=0,
                     atol=tol * max(1.0, float(np.abs(ours_ref).max())))
    check.__doc__ = (f"within {tol:g} x max(1, max|y|) of numpy float32 on the dequantized weights"
                     + (" and, for ours, on x's int8 blocks (q8_0.quantize_activations)" if path in INT8_X_PATHS
                        else " and, for ours, on x rounded to bf16" if path == "dot" else ""))

    n_w = len(quantized)
    return Case(bench=BENCH, name=f"{model}_{name}_M{M}_{'N%dx2' % N if swiglu else 'N%d' % N}_K{K}_q8_0",
                impls={"mojo": lambda: buffer_numpy(ours.execute(*bufs)[0]), "numpy": run_numpy}, check=check,
                flops=2.0 * M * N * K * n_w if M > STREAM_MAX_M else None,
                bytes=n_w * N * q8_0.row_bytes(K) if M <= STREAM_MAX_M else None,
                versions={"mojo": f"kernels/linear.mojo ({path} path, Q8_0)",
                          "numpy": f"numpy {np.__version__} (dequantized float32)"})


def _case(torch, models, rng, model, name, N, K, swiglu, M, dt) -> Case:
    bf16 = dt == DType.bfloat16
    wname = "bf16" if bf16 else "f32"
    weights = [(rng.standard_normal((N, K), dtype=np.float32) / np.float32(np.sqrt(K))) for _ in range(2 if swiglu else 1)]
    x = rng.standard_normal((M, K), dtype=np.float32)
    if bf16:  # the values each implementation sees; float32 copies for numpy and the check
        x16, w16 = f32_to_bf16_bits(x), [f32_to_bf16_bits(w) for w in weights]
        x, weights = bf16_bits_to_f32(x16), [bf16_bits_to_f32(w) for w in w16]
        bufs = [to_buffer(a, dt) for a in (x16, *w16)]
        tx = torch.from_numpy(x16.view(np.int16)).view(torch.bfloat16)
        tw = [torch.from_numpy(w.view(np.int16)).view(torch.bfloat16) for w in w16]
    else:
        bufs = [Buffer.from_numpy(a) for a in (x, *weights)]
        tx, tw = torch.from_numpy(x), [torch.from_numpy(w) for w in weights]
    F = torch.nn.functional

    def run(model_):
        return lambda: to_dtype(buffer_numpy(model_.execute(*bufs)[0]), DType.float32)

    def run_torch():
        with torch.no_grad():
            y = F.silu(F.linear(tx, tw[0])) * F.linear(tx, tw[1]) if swiglu else F.linear(tx, tw[0])
            return y.float().numpy()

    def run_numpy():
        y = x @ weights[0].T
        return y / (1 + np.exp(-y)) * (x @ weights[1].T) if swiglu else y

    impls = {"mojo": run(models["mojo", swiglu, dt]), "max": run(models["max", swiglu, dt]), "torch": run_torch}
    if not bf16:
        impls["numpy"] = run_numpy
    ref = run_numpy()
    tol = TOL[dt]
    peer_tol = PEER_BF16_SWIGLU_TOL if bf16 and swiglu else tol

    def check(outputs):
        for impl, y in outputs.items():
            t = tol if impl == "mojo" else peer_tol
            assert_close(f"linear ({impl} vs numpy float32)", y, ref, rtol=0, atol=t * max(1.0, float(np.abs(ref).max())))
    check.__doc__ = (f"every implementation within {tol:g} x max(1, max|y|) of numpy float32 on the same values"
                     + (f" (the peers' three-op bf16 SwiGLU: {peer_tol:g})" if peer_tol != tol else ""))

    n_w = len(weights)
    path = linear_path(M, K, bf16)
    return Case(bench=BENCH, name=f"{model}_{name}_M{M}_{'N%dx2' % N if swiglu else 'N%d' % N}_K{K}_{wname}",
                impls=impls, check=check, flops=2.0 * M * N * K * n_w if M > STREAM_MAX_M else None,
                bytes=n_w * N * K * (2 if bf16 else 4) if M <= STREAM_MAX_M else None,
                versions={"mojo": f"kernels/linear.mojo ({path} path)", "max": f"max {version('max')} matmul",
                          "torch": f"torch {torch.__version__} F.linear", "numpy": f"numpy {np.__version__}"})


DOT_PEAK_REPS = 50_000


def _dot_peak_case(session, cores: int) -> Case:
    cpu = DeviceRef.CPU()
    with Graph("bench_linear_dot_peak", input_types=[TensorType(DType.int64, [1], device=cpu)],
               custom_extensions=[MOJO_KERNELS]) as g:
        g.output(linear_dot_peak(g.inputs[0].tensor, cores))
    model = session.load(g)
    reps = Buffer.from_numpy(np.array([DOT_PEAK_REPS], np.int64))

    def check(outputs):
        """every core's sum is exactly 2 x reps (bf16 (1, 1) . (2^-7, 2^-7) pairs, KC per call)"""
        assert_close("dot_peak", outputs["mojo"], np.full(cores, 2.0 * DOT_PEAK_REPS), rtol=0, atol=0)

    return Case(bench=BENCH, name=f"dot_peak_{cores}cores", impls={"mojo": lambda: model.execute(reps)[0].to_numpy()},
                check=check, flops=float(cores) * DOT_PEAK_REPS * DOT_TILE_FLOPS,
                versions={"mojo": "kernels/microkernels.mojo dot_tile (kernels/linear.mojo linear_dot_peak)"})


STREAM_PEAK_BYTES = 384 << 10  # the stream_peak cases' weights: in one core's L2 (1 MiB on Zen 4, 2 MiB on Xeons)
STREAM_PEAK_PASS_BYTES = 1 << 30  # weight bytes a stream_peak execute consumes per core at M 1 (1/M of it at M)
STREAM_PEAK_FORMATS = {"f32": DType.float32, "bf16": DType.bfloat16, "q8_0": DType.uint8}


def _stream_peak_case(session, rng, cores: int, fmt: str, M: int, K: int) -> Case:
    """`linear_stream_peak` for one weight format and M, checked against `linear`'s numpy reference."""
    cpu = DeviceRef.CPU()
    q8 = fmt == "q8_0"
    dt = DType.float32 if q8 else STREAM_PEAK_FORMATS[fmt]
    row_bytes = q8_0.row_bytes(K) if q8 else K * (2 if dt == DType.bfloat16 else 4)
    N = max(8, STREAM_PEAK_BYTES // row_bytes // 8 * 8)  # whole passes of 8 rows
    w = rng.standard_normal((N, K), dtype=np.float32) / np.float32(np.sqrt(K))
    x = rng.standard_normal((M, K), dtype=np.float32)
    path = linear_path(M, K, dt == DType.bfloat16, q8)
    if q8:
        w_op = q8_0.quantize(w)
        w = q8_0.dequantize(w_op)
        x_op = x
        if path in INT8_X_PATHS:  # ours dots x's int8 blocks
            x = q8_0.quantize_activations(x).astype(np.float32)
    elif dt == DType.bfloat16:
        x_op, w_op = f32_to_bf16_bits(x), f32_to_bf16_bits(w)
        x, w = bf16_bits_to_f32(x_op), bf16_bits_to_f32(w_op)
    else:
        x_op, w_op = x, w
    w_type = TensorType(DType.uint8 if q8 else dt, [N, w_op.shape[1]], device=cpu)
    with Graph(f"bench_linear_stream_peak_{fmt}_M{M}_K{K}", custom_extensions=[MOJO_KERNELS],
               input_types=[TensorType(dt, [M, K], device=cpu), w_type, TensorType(DType.int64, [1], device=cpu)]) as g:
        g.output(linear_stream_peak(*(v.tensor for v in g.inputs), cores))
    model = session.load(g)
    reps = max(1, STREAM_PEAK_PASS_BYTES // (N * row_bytes) // M)
    bufs = [to_buffer(x_op, dt), Buffer.from_numpy(w_op) if q8 else to_buffer(w_op, dt),
            Buffer.from_numpy(np.array([reps], np.int64))]
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    tol = TOL[dt]

    def check(outputs):
        y = to_dtype(outputs["mojo"], DType.float32)
        for worker in range(cores):
            assert_close(f"stream_peak {fmt} (worker {worker} vs numpy)", y[worker], ref, rtol=0,
                         atol=tol * max(1.0, float(np.abs(ref).max())))
    check.__doc__ = (f"every core's y within {tol:g} x max(1, max|y|) of x @ w^T in float64 on the same values"
                     + (" (x as its int8 blocks)" if path in INT8_X_PATHS else ""))

    return Case(bench=BENCH, name=f"stream_peak_{cores}cores_M{M}_N{N}_K{K}_{fmt}",
                impls={"mojo": lambda: buffer_numpy(model.execute(*bufs)[0])}, check=check,
                bytes=float(cores) * reps * N * row_bytes,
                versions={"mojo": f"kernels/linear.mojo ({path} path: "
                                  "linear_stream_peak, weights in L2)"})


def cases(quick: bool, cores: int = 1):
    """Yields the cases one at a time, so only one case's inputs are alive (Hy3's lm_head is 2 GB in float32)."""
    import torch

    session = InferenceSession(devices=[CPU()])
    models = {(impl, swiglu, dt): _graph(session, dt, swiglu, impl == "mojo")
              for impl in ("mojo", "max") for swiglu in (False, True) for dt in (DType.float32, DType.bfloat16)}
    models.update({("mojo", swiglu, "q8_0"): _q8_graph(session, swiglu) for swiglu in (False, True)})
    if bf16_dot_available():
        yield _dot_peak_case(session, cores)
    rng = np.random.default_rng(0)
    for fmt in STREAM_PEAK_FORMATS:
        for M in ((1,) if quick else DECODE_MS):
            yield _stream_peak_case(session, rng, cores, fmt, M, 256 if quick else 4096)
    for model, shapes in (QUICK if quick else FULL).items():
        for name, (N, K, swiglu, Ms) in shapes.items():
            for dt in (DType.float32, DType.bfloat16):
                for M in Ms:
                    yield _case(torch, models, rng, model, name, N, K, swiglu, M, dt)
            for M in Ms:
                yield _q8_case(models, rng, model, name, N, K, swiglu, M)


def _format_and_m(case: str) -> tuple[str, int]:
    """("f32" | "bf16" | "q8_0", M) of a case name such as `hy3_qkv_M8_N10240_K4096_q8_0`."""
    fmt = next(f for f in STREAM_PEAK_FORMATS if case.endswith("_" + f))
    return fmt, int(next(part[1:] for part in case.split("_") if part[:1] == "M" and part[1:].isdigit()))


def results(quick: bool, machine: dict) -> list[dict]:
    rows = [row for case in cases(quick, machine["cores"]) for row in run_case(case, machine)]
    peak = next((r["gflops"] for r in rows if r["case"].startswith("dot_peak")), None)
    stream_peaks = {_format_and_m(r["case"]): r["gbs"]
                    for r in rows if r["case"].startswith("stream_peak")}
    for r in rows:
        if peak and r["case"].endswith(("_bf16", "_q8_0")) and r.get("gflops"):  # the bf16-dot GEMM rows
            r["dot_peak_frac"] = r["gflops"] / peak
        if r["impl"] == "mojo" and r.get("gbs") and not r["case"].startswith("stream_peak"):  # the streaming rows
            ceiling = stream_peaks.get(_format_and_m(r["case"]))
            if ceiling:
                r["stream_peak_gbs"] = ceiling
                r["stream_peak_frac"] = r["gbs"] / ceiling
    return rows
