"""Fuzz `kernels/linear.mojo` (`linear`, `linear_swiglu`, and their Q8_0-weight forms) against `linear_reference`
(float64; for Q8_0 weights, on the dequantized weights, which the ops compute with exactly).

One graph per dtype, compiled once per session, computes both ops on the same x (the weight doubles as
SwiGLU's gate); M, N and K are symbolic, so hypothesis varies every shape at run time without recompiling.
Every path is reached: STREAM (M <= 16), AMX (bf16, M > 16, K a multiple of 32, AMX-BF16), DOT (bf16, M > 16, even
K, AVX512_BF16; HYV3_DISABLE_AMX=1 where AMX would run), MATMUL (float32, M > 16), and the portable streaming path
(HYV3_PORTABLE_KERNELS=1; bf16 at any M). The switches are read on every call; the fuzz test draws one per example.

Tolerance, per element: float32 sums against float64 are held to RTOL x (|x| @ |w|^T), the sum of the
magnitudes (SwiGLU: that bound carried through silu(g) * u); a bf16 output adds one rounding, 2^-8 x |y|
(round to nearest even is within 2^-9). bf16 inputs are exact in float64 and bf16 products exact in float32, so
no activation rounding needs modelling: the dot and AMX paths use x's own bf16 values. The Q8_0 ops keep x as it
is (float32, or bf16 widened exactly) and dequantize the weights exactly (d * q fits float32): the same bound.
Where their streaming path runs vpdpbusd (AVX512_VNNI), x is quantized to int8 blocks first; the reference then
takes exactly those values (q8_0.quantize_activations), and the int32 block sums are exact: the same bound again.
Their GEMM on vdpbf16ps (AVX512_BF16, M > 16) rounds a float32 x to bf16 (the reference takes those values) and
sums each block's exact q * x products in float32 before scaling by d: the same bound.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from max.driver import CPU
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType

from hyv3_graph import q8_0
from hyv3_graph.dtypes import bf16_rounded, buffer_numpy, to_buffer, to_dtype
from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.cpu_isa import (DISABLE_AMX_ENV, PORTABLE_ENV, bf16_dot_available, cpu_has_avx512_bf16,
                                        cpu_has_avx512_vnni, vnni_available)
from hyv3_graph.kernels.linear import (INT8_X_PATHS, Q8_LANES_MIN_M, Q8_LANES_NARROW_M, STREAM_MAX_M, linear,
                                       linear_path, linear_reference, linear_stream_peak, linear_swiglu)

from conftest import ISA_MODES, set_isa

RTOL = 1e-5  # of the sum of magnitudes: float32 accumulation over K <= ~1e4 terms (measured <= 2e-7)
BF16_OUT = 2.0**-8  # one bf16 rounding of the output, relative to |y|
LANES_RTOL = 1e-5  # Q8_0's lanes and row paths: the same exact block sums in another float32 order, of max|y|
DTYPES = (DType.float32, DType.bfloat16)


def _both_ops(q8: bool) -> dict:
    """{activation dtype: a graph computing (linear(x, w), linear_swiglu(x, w, up))}; M, N and K symbolic. q8: w and
    up are Q8_0 bytes (uint8 [N, K / 32 * 34]), else in x's dtype."""
    cpu = DeviceRef.CPU()
    session = InferenceSession(devices=[CPU()])
    models = {}
    for dt in DTYPES:
        w_type = TensorType(DType.uint8, ["N", "KQ"], device=cpu) if q8 else TensorType(dt, ["N", "K"], device=cpu)
        with Graph(f"linear_{'q8_0_' if q8 else ''}{dt}", input_types=[TensorType(dt, ["M", "K"], device=cpu), w_type,
                                                                        w_type], custom_extensions=[MOJO_KERNELS]) as g:
            x, w, up = (v.tensor for v in g.inputs)
            g.output(linear(x, w), linear_swiglu(x, w, up))
        models[dt] = session.load(g)
    return models


@pytest.fixture(scope="session")
def linear_models():
    return _both_ops(q8=False)


@pytest.fixture(scope="session")
def q8_models():
    return _both_ops(q8=True)


def _values(rng, shape, dt, scale=1.0):
    """Random values of dtype dt, as float32 (bf16: rounded, so they are exactly what the op sees)."""
    a = (rng.standard_normal(shape) * scale).astype(np.float32)
    return bf16_rounded(a) if dt == DType.bfloat16 else a


def run(models, dt, x, w, up):
    """(linear, linear_swiglu) outputs as float32."""
    y, z = models[dt].execute(*(to_buffer(to_dtype(a, dt), dt) for a in (x, w, up)))
    return tuple(to_dtype(buffer_numpy(o), DType.float32) for o in (y, z))


def run_q8(models, dt, x, wq, uq):
    """(linear, linear_swiglu) outputs as float32, for Q8_0 weight bytes wq and uq."""
    y, z = models[dt].execute(to_buffer(to_dtype(x, dt), dt), to_buffer(wq, DType.uint8), to_buffer(uq, DType.uint8))
    return tuple(to_dtype(buffer_numpy(o), DType.float32) for o in (y, z))


def check(models, dt, x, w, up):
    return check_outputs(run(models, dt, x, w, up), dt, x, w, up)


def check_q8(models, dt, x, wq, uq):
    """The Q8_0 ops against the reference on the dequantized weights, and on the activations the call's path
    computes with: x's int8 blocks on the vpdpbusd paths (linear_path "vnni", "lanes"), x rounded to bf16 on the
    bf16-dot GEMM ("dot"), else x itself."""
    path = linear_path(x.shape[0], x.shape[1], dt == DType.bfloat16, q8=True)
    x_ref = q8_0.quantize_activations(x) if path in INT8_X_PATHS else bf16_rounded(x) if path == "dot" else x
    return check_outputs(run_q8(models, dt, x, wq, uq), dt, x_ref, q8_0.dequantize(wq), q8_0.dequantize(uq))


def check_outputs(outputs, dt, x, w, up):
    y, z = outputs
    M, N = x.shape[0], w.shape[0]
    assert y.shape == (M, N) and z.shape == (M, N)
    out_round = BF16_OUT if dt == DType.bfloat16 else 0.0
    ax = np.abs(x).astype(np.float64)
    for n0 in range(0, N, 4096):  # in column chunks: Hy3's lm_head is 4 GB in float64
        wc, uc, yc, zc = w[n0:n0 + 4096], up[n0:n0 + 4096], y[:, n0:n0 + 4096], z[:, n0:n0 + 4096]
        g, u = linear_reference(x, wc), linear_reference(x, uc)
        ref_z = linear_reference(x, wc, uc)
        s_g, s_u = ax @ np.abs(wc).T.astype(np.float64), ax @ np.abs(uc).T.astype(np.float64)
        silu_g = g / (1.0 + np.exp(-g))
        tol_y = RTOL * s_g + out_round * np.abs(g) + 1e-30
        tol_z = RTOL * (1.1 * s_g * (np.abs(u) + RTOL * s_u) + np.abs(silu_g) * s_u) + out_round * np.abs(ref_z) + 1e-30
        assert np.all(np.abs(yc - g) <= tol_y), f"linear: worst {np.max(np.abs(yc - g) / tol_y):.3g} x tolerance"
        worst_z = np.max(np.abs(zc - ref_z) / tol_z, initial=0)
        assert np.all(np.abs(zc - ref_z) <= tol_z), f"swiglu: worst {worst_z:.3g} x tolerance"
    return y, z


SIZES = [1, 2, 7, 16, 33, 64, 130, 257]


@st.composite
def linear_case(draw):
    dt = draw(st.sampled_from(DTYPES))
    M = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 16, 17, 47, 48, 49, 97]), st.integers(0, 600)))
    N = draw(st.one_of(st.sampled_from(SIZES), st.integers(1, 300)))
    K = draw(st.one_of(st.sampled_from(SIZES + [0, 32, 96, 1000, 1024, 1031, 1100]), st.integers(1, 1200)))
    while M * N * max(K, 1) > 3_000_000:  # keep one example well under a second (the float64 reference dominates)
        M //= 2
    isa = draw(st.sampled_from(ISA_MODES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = _values(rng, (M, K), dt)
    w, up = (_values(rng, (N, K), dt, 1 / np.sqrt(max(K, 1))) for _ in range(2))
    return dt, x, w, up, isa


@st.composite
def q8_case(draw):
    dt = draw(st.sampled_from(DTYPES))
    M = draw(st.one_of(st.sampled_from([0, 1, 2, 4, 5, 8, 9, 13, 16, 17, 24, 48, 97, 256, 257, 300]),
                       st.integers(0, 600)))
    N = draw(st.one_of(st.sampled_from(SIZES + [255, 256, 257, 600]), st.integers(1, 300)))
    K = 32 * draw(st.one_of(st.sampled_from([0, 1, 2, 3, 16, 17, 33]), st.integers(1, 40)))
    while M * N * max(K, 1) > 3_000_000:
        M //= 2
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = _values(rng, (M, K), dt)
    wq, uq = (q8_0.quantize(_values(rng, (N, K), DType.float32, 1 / np.sqrt(max(K, 1)))) for _ in range(2))
    return dt, x, wq, uq, draw(st.sampled_from(ISA_MODES))


@settings(max_examples=120)
@given(q8_case())
def test_q8_0_matches_reference(q8_models, case):
    """Q8_0 weights, both activation dtypes: streaming at M <= 16 (vpdpbusd on int8 x where the CPU has
    AVX512_VNNI, float32 x on the portable path: the fuzz draws the ISA mode); at more rows the bf16-dot GEMM
    (AVX512_BF16; partial activation blocks, weight rows past N, K slices past 128 pairs) or, portable, DEQUANT (N
    past one chunk of 256 dequantized rows); K in whole blocks, including one block, odd block counts (the vpdpbusd
    path's ymm tail); K slices: test_stream_k_slices."""
    dt, x, wq, uq, isa = case
    with pytest.MonkeyPatch.context() as m:
        set_isa(m, isa)
        check_q8(q8_models, dt, x, wq, uq)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("M", [1, Q8_LANES_MIN_M - 1, Q8_LANES_MIN_M, Q8_LANES_NARROW_M + 1, STREAM_MAX_M,
                               STREAM_MAX_M + 1, 200])
def test_q8_0_deterministic_bit_for_bit(q8_models, dt, M):
    rng = np.random.default_rng(M)
    x = _values(rng, (M, 1024), dt)
    wq, uq = (q8_0.quantize(_values(rng, (300, 1024), DType.float32, 0.03)) for _ in "wu")
    a, b = run_q8(q8_models, dt, x, wq, uq), run_q8(q8_models, dt, x, wq, uq)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert linear_path(M, 1024, bf16=dt == DType.bfloat16, q8=True) == (
        (("lanes" if M >= Q8_LANES_MIN_M else "vnni") if vnni_available() else "stream") if M <= STREAM_MAX_M
        else "dot" if bf16_dot_available() else "dequant")


@pytest.mark.skipif(not cpu_has_avx512_vnni(), reason="the CPU has no AVX512_VNNI")
def test_vnni_path_is_taken(q8_models, monkeypatch):
    """Where the CPU has AVX512_VNNI the Q8_0 streaming path runs vpdpbusd on int8-quantized x (a forced portable
    setting in the environment does not turn this into a skip): its outputs meet the reference on the quantized x,
    and differ from the portable path's, which meet it on x itself. From Q8_LANES_MIN_M rows x's rows sit in the
    vector lanes ("lanes": 8 of them up to Q8_LANES_NARROW_M rows, 16 above). K = 1056 is 33 blocks (the row path's
    ymm tail)."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    rng = np.random.default_rng(11)
    for M in (1, 3, Q8_LANES_MIN_M - 1, Q8_LANES_MIN_M, Q8_LANES_NARROW_M + 1, STREAM_MAX_M):
        x = _values(rng, (M, 1056), DType.float32)
        wq, uq = (q8_0.quantize(_values(rng, (200, 1056), DType.float32, 0.03)) for _ in "wu")
        assert linear_path(M, 1056, bf16=False, q8=True) == ("lanes" if M >= Q8_LANES_MIN_M else "vnni")
        fast = check_q8(q8_models, DType.float32, x, wq, uq)
        monkeypatch.setenv(PORTABLE_ENV, "1")
        assert linear_path(M, 1056, bf16=False, q8=True) == "stream"
        exact = check_q8(q8_models, DType.float32, x, wq, uq)
        monkeypatch.delenv(PORTABLE_ENV)
        assert not np.array_equal(fast[0], exact[0]), f"M={M}: the vpdpbusd path gave the float32 path's bits"


@pytest.mark.skipif(not cpu_has_avx512_vnni(), reason="the CPU has no AVX512_VNNI")
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("K", [32, 1056, 4096])
def test_q8_0_lanes_match_rows(q8_models, monkeypatch, dt, K):
    """The lanes path (x's rows in the vector lanes, from Q8_LANES_MIN_M rows) and the row path (below it) dot the
    same int8 blocks with exact int32 block sums: each row's outputs agree to float32 summation order, far inside
    the reference's tolerance. Both lane widths run: 8 (ymm) at M 6 and 8, every lane a row at 8; 16 at M 9 and
    16, every lane a row at 16."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    rng = np.random.default_rng(K)
    x = _values(rng, (STREAM_MAX_M, K), dt)
    wq, uq = (q8_0.quantize(_values(rng, (37, K), DType.float32, 1 / np.sqrt(K))) for _ in "wu")
    step = Q8_LANES_MIN_M - 1  # the row path's largest call
    rows = [run_q8(q8_models, dt, x[m:m + step], wq, uq) for m in range(0, STREAM_MAX_M, step)]
    for M in (Q8_LANES_MIN_M, Q8_LANES_NARROW_M, Q8_LANES_NARROW_M + 1, STREAM_MAX_M):
        assert linear_path(M, K, bf16=dt == DType.bfloat16, q8=True) == "lanes"
        lanes = run_q8(q8_models, dt, x[:M], wq, uq)
        for out, by_rows in zip(lanes, zip(*rows)):
            want = np.concatenate(by_rows)[:M]
            # float32 sums of K / 32 exact block products in another order; a bf16 y may land one ulp (2^-7) apart
            tol = LANES_RTOL * float(np.abs(want).max()) + (2 * BF16_OUT * np.abs(want) if dt == DType.bfloat16 else 0)
            assert np.all(np.abs(out - want) <= tol), f"M={M} K={K}: {np.abs(out - want).max()}"


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the CPU has no AVX512_BF16")
def test_q8_0_dot_path_is_taken(q8_models, monkeypatch):
    """Where the CPU has AVX512_BF16 the Q8_0 ops' GEMM (M > 16) runs vdpbf16ps on the blocks' int8 values (a forced
    portable setting in the environment does not turn this into a skip): it meets the reference on x rounded to
    bf16, and differs from DEQUANT (the portable choice), which meets it on x itself. Shapes: one partial
    activation block with weight rows past N; K 4128 (129 blocks: a last K slice of one block) with 97 rows."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    rng = np.random.default_rng(12)
    for M, N, K in ((17, 70, 96), (97, 300, 4128)):
        x = _values(rng, (M, K), DType.float32)
        wq, uq = (q8_0.quantize(_values(rng, (N, K), DType.float32, 1 / np.sqrt(K))) for _ in "wu")
        assert linear_path(M, K, bf16=False, q8=True) == "dot"
        fast = check_q8(q8_models, DType.float32, x, wq, uq)
        monkeypatch.setenv(PORTABLE_ENV, "1")
        assert linear_path(M, K, bf16=False, q8=True) == "dequant"
        exact = check_q8(q8_models, DType.float32, x, wq, uq)
        monkeypatch.delenv(PORTABLE_ENV)
        assert not np.array_equal(fast[0], exact[0]), f"M={M}: the bf16-dot GEMM gave DEQUANT's bits"


@pytest.mark.parametrize("K,cols", [(33, 34), (64, 34), (64, 70)])
def test_q8_0_bad_k_is_refused(q8_models, K, cols):
    """K no multiple of 32 (Q8_0 rows are whole blocks: no padding), or weight bytes that are not K's blocks."""
    x = np.ones((2, K), np.float32)
    w = np.zeros((3, cols), np.uint8)
    with pytest.raises(Exception, match="multiple of 32|Q8_0 bytes"):
        run_q8(q8_models, DType.float32, x, w, w)


@given(linear_case())
def test_linear_matches_reference(linear_models, case):
    dt, x, w, up, isa = case
    with pytest.MonkeyPatch.context() as m:
        set_isa(m, isa)
        check(linear_models, dt, x, w, up)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("M,K", [(1, 1030), (5, 1030), (STREAM_MAX_M + 1, 1030), (200, 1030), (200, 1024)])
def test_deterministic_bit_for_bit(linear_models, dt, M, K):
    rng = np.random.default_rng(M)
    x, w, up = _values(rng, (M, K), dt), _values(rng, (300, K), dt, 0.03), _values(rng, (300, K), dt, 0.03)
    a, b = run(linear_models, dt, x, w, up), run(linear_models, dt, x, w, up)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


PEAK_WORKERS = 2  # the stream_peak graphs' workers: two copies of y, each from its own core's passes


@pytest.fixture(scope="session")
def stream_peak_models():
    """{(activation dtype, q8): graph of linear_stream_peak(x, w, reps)}; M, N and K symbolic."""
    cpu = DeviceRef.CPU()
    session = InferenceSession(devices=[CPU()])
    models = {}
    for dt in DTYPES:
        for q8 in (False, True):
            w_type = TensorType(DType.uint8, ["N", "KQ"], device=cpu) if q8 else TensorType(dt, ["N", "K"], device=cpu)
            types = [TensorType(dt, ["M", "K"], device=cpu), w_type, TensorType(DType.int64, [1], device=cpu)]
            with Graph(f"linear_stream_peak_{'q8_0_' if q8 else ''}{dt}", input_types=types,
                       custom_extensions=[MOJO_KERNELS]) as g:
                g.output(linear_stream_peak(*(v.tensor for v in g.inputs), PEAK_WORKERS))
            models[dt, q8] = session.load(g)
    return models


# The bench's streaming yardstick runs `linear`'s own STREAM passes (kernels/linear.mojo `_stream_peak`): every
# worker's y is bit for bit the op's, whatever the reps, on every ISA path; shapes past streaming are refused.
@pytest.mark.parametrize("q8", [False, True])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 5, 16])
@pytest.mark.parametrize("isa", ["default", "portable"])
def test_stream_peak_is_linear_bit_for_bit(linear_models, q8_models, stream_peak_models, q8, dt, M, isa,
                                           monkeypatch):
    set_isa(monkeypatch, isa)
    rng = np.random.default_rng(M)
    N, K = 44, 320
    x = _values(rng, (M, K), dt)
    w = _values(rng, (N, K), DType.float32 if q8 else dt, 1 / np.sqrt(K))
    w_op = q8_0.quantize(w) if q8 else w
    w_buf = to_buffer(w_op, DType.uint8) if q8 else to_buffer(to_dtype(w, dt), dt)
    peak = stream_peak_models[dt, q8]
    y = to_dtype(buffer_numpy(peak.execute(to_buffer(to_dtype(x, dt), dt), w_buf,
                                           to_buffer(np.array([3], np.int64), DType.int64))[0]), DType.float32)
    ours = (run_q8(q8_models, dt, x, w_op, w_op) if q8 else run(linear_models, dt, x, w, w))[0]
    assert y.shape == (PEAK_WORKERS, M, N)
    for worker in range(PEAK_WORKERS):
        assert np.array_equal(y[worker], ours), f"worker {worker}: not linear's bits"
    with pytest.raises(Exception, match="not a streaming shape"):
        peak.execute(to_buffer(to_dtype(_values(rng, (STREAM_MAX_M + 1, K), dt), dt), dt), w_buf,
                     to_buffer(np.array([1], np.int64), DType.int64))


# Streaming at M > 4 with rows too long for the whole-row passes (kernels/linear.mojo `_stream_k_slice`: the chunk's x
# rows past 256 KiB in the form the dots read): the reduction runs in K slices of 2048, the last one partial. The
# fuzz tests' K (<= 1200) always runs whole rows.
@pytest.mark.parametrize("M,K", [(5, 13312), (16, 4100), (16, 8260)])
@pytest.mark.parametrize("isa", ["default", "portable"])
def test_stream_k_slices(linear_models, q8_models, M, K, isa, monkeypatch):
    set_isa(monkeypatch, isa)
    rng = np.random.default_rng(M * K)
    Kq = -(-K // q8_0.BLOCK) * q8_0.BLOCK  # Q8_0 rows are whole blocks
    for dt in DTYPES:
        assert linear_path(M, K, bf16=dt == DType.bfloat16) == "stream"
        x = _values(rng, (M, K), dt)
        w, up = (_values(rng, (37, K), dt, 1 / np.sqrt(K)) for _ in "wu")
        check(linear_models, dt, x, w, up)
        xq = _values(rng, (M, Kq), dt)
        wq, uq = (q8_0.quantize(_values(rng, (37, Kq), DType.float32, 1 / np.sqrt(Kq))) for _ in "wu")
        check_q8(q8_models, dt, xq, wq, uq)


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the CPU has no AVX512_BF16")
def test_bf16_paths_are_taken(linear_models, monkeypatch):
    """Where the CPU has AVX512_BF16 its paths must run (a forced portable setting in the environment does not turn
    this into a skip): the vdpbf16ps streaming and GEMM paths sum in another order than the portable path, so
    their outputs differ from it somewhere in the last bits, and all three meet the reference."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    monkeypatch.delenv(DISABLE_AMX_ENV, raising=False)
    rng = np.random.default_rng(3)
    for M in (3, 64):  # K = 2000 is no multiple of 32: the vdpbf16ps GEMM even where AMX is present
        x = _values(rng, (M, 2000), DType.bfloat16)
        w, up = (_values(rng, (256, 2000), DType.bfloat16, 0.02) for _ in "wu")
        assert linear_path(M, 2000, bf16=True) == ("stream" if M <= STREAM_MAX_M else "dot")
        fast = check(linear_models, DType.bfloat16, x, w, up)
        monkeypatch.setenv(PORTABLE_ENV, "1")
        slow = check(linear_models, DType.bfloat16, x, w, up)
        monkeypatch.delenv(PORTABLE_ENV)
        assert not np.array_equal(fast[0], slow[0]), f"M={M}: the vdpbf16ps path gave the portable path's bits"


@pytest.mark.parametrize("M,N,K,differs", [(17, 40, 32, False), (64, 300, 2048, True), (97, 47, 1056, False),
                                            (600, 100, 288, False)])
def test_amx_path_is_taken(linear_models, amx, monkeypatch, M, N, K, differs):
    """Where the CPU has AMX its GEMM must run (HYV3_REQUIRE_AMX=1: or fail): it meets the reference, as does the
    vdpbf16ps GEMM (HYV3_DISABLE_AMX=1); on the long-K case their float32 sums differ in order, enough to show in
    the bf16 outputs (`differs`: the path really changed). Shapes: a lone 16-token tile and weight rows past N
    (tail tiles copied), K beyond one AMX_KC slice, M beyond one task's chunk of 528 rows."""
    rng = np.random.default_rng(M)
    x, w, up = _values(rng, (M, K), DType.bfloat16), *(_values(rng, (N, K), DType.bfloat16, 0.05) for _ in "wu")
    assert linear_path(M, K, bf16=True) == "amx"
    fast = check(linear_models, DType.bfloat16, x, w, up)
    monkeypatch.setenv(DISABLE_AMX_ENV, "1")
    assert linear_path(M, K, bf16=True) == "dot"
    dot = check(linear_models, DType.bfloat16, x, w, up)
    if differs:
        assert not np.array_equal(fast[0], dot[0]), "the AMX path gave the vdpbf16ps path's bits"


# Hy3's dense projections (N, K): qkv, o_proj, the dense MLP's gate/up and down, lm_head. K beyond one KC slice
# (128 pairs) many times over, N far beyond one task.
HY3_SHAPES = {"qkv": (10240, 4096), "o_proj": (4096, 8192), "gate_up": (13312, 4096), "down": (4096, 13312),
              "lm_head": (120832, 4096)}


@pytest.mark.parametrize("shape", sorted(HY3_SHAPES))
def test_hy3_shapes(linear_models, q8_models, shape):
    """One example at each Hy3 shape, both dtypes: M = 1 (decode) and, except lm_head, M = 24 (the GEMM paths);
    with Q8_0 weights too, except lm_head (its K is qkv's)."""
    N, K = HY3_SHAPES[shape]
    rng = np.random.default_rng(len(shape))
    w32 = (rng.standard_normal((N, K), dtype=np.float32) / np.float32(np.sqrt(K)))
    up32 = w32[::-1].copy() if shape == "gate_up" else w32  # SwiGLU runs on every shape; its own weights for gate_up
    for dt in DTYPES:
        w, up = (bf16_rounded(a) for a in (w32, up32)) if dt == DType.bfloat16 else (w32, up32)
        for M in (1,) if shape == "lm_head" else (1, 24):
            check(linear_models, dt, _values(rng, (M, K), dt), w, up)
    if shape != "lm_head":
        wq, uq = q8_0.quantize(w32), q8_0.quantize(up32)
        for dt in DTYPES:
            for M in (1, 24):
                check_q8(q8_models, dt, _values(rng, (M, K), dt), wq, uq)
