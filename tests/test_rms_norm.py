"""Fuzz `kernels/rms_norm.mojo` (`rms_norm`, `add_rms_norm`) against `rms_norm_reference`
(hyv3_graph/kernels/rms_norm.py).

One graph per (op, dtype, eps) variant, compiled once per session; T and H are symbolic, so hypothesis varies
shapes at run time. Tolerances: the residual sum s is exact (one rounding of a float32 sum); y differs from the
reference only through the float32 sum of squares (the reference sums in float64): float32 y within 2e-6 of its
value (a few ulps of the normalization), bf16 y within two bf16 ulps of the larger of the two values (the normalized
value can land on the other side of a bf16 rounding boundary, then the weight's product rounds once more).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from max.driver import CPU
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType

from hyv3_graph.dtypes import bf16_bits_to_f32, buffer_numpy, f32_to_bf16_bits, to_buffer
from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_reference

VARIANTS = [(DType.float32, 1e-5), (DType.bfloat16, 1e-5), (DType.float32, 0.25), (DType.bfloat16, 0.25)]
F32_RTOL = 2e-6
BF16_ULPS = 2  # one of the normalized value, one of the weight's product


def assert_bf16_close(got: np.ndarray, expect: np.ndarray):
    """|got - expect| <= BF16_ULPS bf16 ulps of max(|got|, |expect|) (a bf16 ulp of m * 2^e, 0.5 <= m < 1: 2^(e-8))."""
    _, e = np.frexp(np.maximum(np.abs(got), np.abs(expect)))
    bad = np.abs(got - expect) > BF16_ULPS * np.ldexp(np.float32(1), e - 8)
    assert not bad.any(), f"{bad.sum()} elements beyond {BF16_ULPS} bf16 ulps, e.g. {got[bad][:4]} vs {expect[bad][:4]}"


@pytest.fixture(scope="session")
def norm_models():
    cpu = DeviceRef.CPU()
    session = InferenceSession(devices=[CPU()])
    models = {}
    for dt, eps in VARIANTS:
        for fused in (False, True):
            rows = TensorType(dt, ["T", "H"], device=cpu)
            weight = TensorType(dt, ["H"], device=cpu)
            types = [rows, rows, weight] if fused else [rows, weight]
            with Graph(f"rms_norm_{fused}_{dt}_{eps}", input_types=types, custom_extensions=[MOJO_KERNELS]) as g:
                if fused:
                    x, d, w = (v.tensor for v in g.inputs)
                    g.output(*add_rms_norm(x, d, w, eps))
                else:
                    x, w = (v.tensor for v in g.inputs)
                    g.output(rms_norm(x, w, eps))
            models[(dt, eps, fused)] = session.load(g)
    return models


def _as_dt(a: np.ndarray, dt: DType) -> np.ndarray:
    """float32 values -> the op's numpy form (bf16 bits for bf16) and the float32 values it holds."""
    if dt == DType.bfloat16:
        bits = f32_to_bf16_bits(a)
        return bits, bf16_bits_to_f32(bits)
    return a.astype(np.float32), a.astype(np.float32)


def _values(out, dt: DType) -> np.ndarray:
    a = buffer_numpy(out)
    return bf16_bits_to_f32(a) if dt == DType.bfloat16 else a


def run(models, dt, eps, x, w, d=None):
    """The op's outputs as float32 values: y, or (s, y) with d."""
    xs, ws = to_buffer(x, dt), to_buffer(w, dt)
    if d is None:
        return _values(models[(dt, eps, False)].execute(xs, ws)[0], dt)
    s, y = models[(dt, eps, True)].execute(xs, to_buffer(d, dt), ws)
    return _values(s, dt), _values(y, dt)


def check(models, dt, eps, x, w, d=None):
    bf16 = dt == DType.bfloat16
    xb, xv = _as_dt(x, dt)
    wb, wv = _as_dt(w, dt)
    if d is None:
        y = run(models, dt, eps, xb, wb)
        ref_y = rms_norm_reference(xv, wv, eps, bf16)
    else:
        db, dv = _as_dt(d, dt)
        s, y = run(models, dt, eps, xb, wb, db)
        ref_s, ref_y = rms_norm_reference(xv, wv, eps, bf16, dv)
        np.testing.assert_array_equal(s, ref_s)
    assert y.shape == x.shape
    if bf16:
        assert_bf16_close(y, ref_y)
    else:
        np.testing.assert_allclose(y, ref_y, rtol=F32_RTOL, atol=1e-30)
    return y


@st.composite
def problems(draw):
    T = draw(st.integers(0, 40))
    H = draw(st.sampled_from([1, 7, 16, 33, 130, 257, 1000, 1024, 4096]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.integers(-3, 3))
    zero_row = draw(st.booleans())
    return T, H, seed, scale, zero_row


def _inputs(T, H, seed, scale, zero_row):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((T, H)) * scale).astype(np.float32)
    d = (rng.standard_normal((T, H)) * scale).astype(np.float32)
    w = (1.0 + 0.5 * rng.standard_normal(H)).astype(np.float32)
    if zero_row and T:
        x[T // 2] = 0
        d[T // 2] = 0
    return x, d, w


@settings(max_examples=120)
@given(problems(), st.sampled_from(VARIANTS), st.booleans())
def test_rms_norm_matches_reference(norm_models, problem, variant, fused):
    x, d, w = _inputs(*problem)
    check(norm_models, *variant, x, w, d if fused else None)


@pytest.mark.parametrize("dt", [DType.float32, DType.bfloat16])
def test_parallel_rows_and_determinism(norm_models, dt):
    """Enough rows to run on every core (work_queue.PARALLEL_MIN_BYTES), at the real model's H; two runs agree to
    the bit."""
    x, d, w = _inputs(300, 4096, 7, 1.0, True)
    y = check(norm_models, dt, 1e-5, x, w, d)
    xb, wb, db = (_as_dt(a, dt)[0] for a in (x, w, d))
    np.testing.assert_array_equal(run(norm_models, dt, 1e-5, xb, wb, db)[1], y)
    np.testing.assert_array_equal(run(norm_models, dt, 1e-5, xb, wb), check(norm_models, dt, 1e-5, x, w))


def test_eps_and_zero_rows(norm_models):
    """A zero row normalizes to zeros (x * 1/sqrt(eps)); eps enters the denominator (a large eps shrinks y)."""
    x = np.zeros((2, 64), np.float32)
    x[1] = 0.5
    w = np.ones(64, np.float32)
    y = run(norm_models, DType.float32, 0.25, x, w)
    np.testing.assert_array_equal(y[0], 0)
    np.testing.assert_allclose(y[1], 0.5 / np.sqrt(0.25 + 0.25), rtol=F32_RTOL)


def test_weight_length_mismatch_raises(norm_models):
    """A weight whose length is not the rows' H never runs (MAX's check of the symbolic H, else the op's own)."""
    x = np.ones((2, 64), np.float32)
    with pytest.raises(Exception, match="dimension 'H'|rms_norm"):
        run(norm_models, DType.float32, 1e-5, x, np.ones(63, np.float32))
