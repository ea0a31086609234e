"""Fuzz `kernels/moe_experts.mojo` against `moe_experts_reference` (float64), routing from `moe_router`.

One graph (router + experts) is compiled once per session per variant (three k with float32 weights, one
with bfloat16 weights, one with Q8_0 weights); T, E, H, I are symbolic, so hypothesis varies every shape at run
time without recompiling. Q8_0 weights are checked against the reference on their dequantized values (the op
computes with exactly those), at the float32 tolerance, or at the bf16-dot one where an expert's GEMM rounds its
activations to bf16 (bf16_dot_experts(..., q8=True)).
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
from hyv3_graph.dtypes import bf16_rounded, to_buffer, to_dtype
from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.cpu_isa import (DISABLE_AMX_ENV, PORTABLE_ENV, bf16_dot_available, cpu_has_avx512_bf16,
                                        cpu_has_avx512_vnni)
from hyv3_graph.kernels.linear import Q8_LANES_MIN_M, Q8_LANES_NARROW_M
from hyv3_graph.kernels.moe_experts import (Q8_LANES_MAX_ROWS, bf16_dot_experts, bf16_gemm, int8_dot_experts,
                                          moe_experts, moe_experts_reference)
from hyv3_graph.kernels.moe_router import moe_router

from conftest import ISA_MODES, set_isa

TOP_K = (1, 3, 8)
BF16_TOP_K = 3  # one bfloat16-weights variant
Q8_TOP_K = 8  # one Q8_0-weights variant (Hy3's k)
# float32 products and sums against a float64 reference, relative to the output's scale
RTOL = 2e-5
# bf16-dot path against the reference that rounds the same activations: float32 sums, plus the rare SwiGLU
# output whose float32 value lands on the other side of a bf16 rounding boundary (one bf16 ulp, 2^-8)
BF16_DOT_RTOL = 1e-3


@pytest.fixture(scope="session")
def experts_models():
    cpu, f32 = DeviceRef.CPU(), DType.float32
    session = InferenceSession(devices=[CPU()])
    models = {}
    for k, wdt in [(k, f32) for k in TOP_K] + [(BF16_TOP_K, DType.bfloat16), (Q8_TOP_K, DType.uint8)]:
        q8 = wdt == DType.uint8  # Q8_0 bytes: the rows' last dim is K / 32 * 34
        types = [TensorType(f32, ["T", "H"], device=cpu), TensorType(f32, ["T", "E"], device=cpu),
                 TensorType(wdt, ["E", "I2", "HQ" if q8 else "H"], device=cpu),
                 TensorType(wdt, ["E", "H", "IQ" if q8 else "I"], device=cpu)]
        with Graph(f"moe_experts_k{k}_{wdt}", input_types=types, custom_extensions=[MOJO_KERNELS]) as g:
            x, logits, gate_up, down = (v.tensor for v in g.inputs)
            bias = logits[0] * 0  # [E] zeros: the routing itself is the router's business
            ids, w, offsets, slots = moe_router(logits, bias, k, 1.0, True)
            g.output(moe_experts(x, w, offsets, slots, gate_up, down), ids, w)
        models[k, wdt] = session.load(g)
    return models


def run(models, k, x, logits, gate_up, down, bf16=False):
    """bf16: the weights go in as bfloat16 (rounded here); returns the weights the op saw, as float32."""
    wdt = DType.bfloat16 if bf16 else DType.float32
    if bf16:
        gate_up, down = bf16_rounded(gate_up), bf16_rounded(down)
    out, ids, w = (o.to_numpy() for o in models[k, wdt].execute(x, logits, to_buffer(to_dtype(gate_up, wdt), wdt),
                                                                  to_buffer(to_dtype(down, wdt), wdt)))
    return out, ids, w, gate_up, down


def run_q8(models, x, logits, gate_up, down):
    """Q8_0 weights (quantized here from float32 [E, 2I, H] and [E, H, I]); returns the dequantized weights."""
    gq, dq = q8_0.quantize(gate_up), q8_0.quantize(down)
    out, ids, w = (o.to_numpy() for o in models[Q8_TOP_K, DType.uint8].execute(x, logits, to_buffer(gq, DType.uint8),
                                                                               to_buffer(dq, DType.uint8)))
    return out, ids, w, q8_0.dequantize(gq), q8_0.dequantize(dq)


def int8_rounding_allowance(x_row, gate_up_e, down_e, window):
    """[H] what one int8 expert's output for x_row may be off by when its SwiGLU outputs are float32 sums, not
    float64 ones: an output within `window` of an int8 step of a rounding boundary may round to the neighbouring
    step d of its block, adding |down column| * d; the others round alike (float32 sums of exact int32 block sums
    are ~2e-5 of a step from float64 ones at these sizes)."""
    I = down_e.shape[1]
    h = gate_up_e.astype(np.float64) @ q8_0.quantize_activations(x_row)
    act = h[:I] / (1 + np.exp(-h[:I])) * h[I:]
    step = np.repeat(np.abs(act.reshape(-1, 32)).max(axis=1) / 127, 32)  # [I]
    near = np.abs(np.abs(act / np.where(step > 0, step, 1)) % 1 - 0.5) < window  # [I] may round either way
    return np.abs(down_e[:, near]) @ step[near]


def check_q8(models, x, logits, gate_up, down):
    """Against the reference on the dequantized weights; where experts stream on vpdpbusd (int8_dot_experts),
    on their int8-quantized x and SwiGLU output. x's blocks are the op's exactly; the SwiGLU output is the op's
    float32 sums, whose int8 rounding may land one step away from the reference's float64 one where it lies near
    a rounding boundary: int8_rounding_allowance within 1e-2 of a step (50x the float32 sums' error seen; a
    SwiGLU element's int8 step allowed everywhere let a 1% error in the output through). Where experts take the
    bf16-dot GEMM (bf16_dot_experts, q8=True), on x and SwiGLU outputs rounded to bf16, at BF16_DOT_RTOL (as
    `check`)."""
    out, ids, w, gate_up, down = run_q8(models, x, logits, gate_up, down)
    E, H, I = down.shape
    int8 = int8_dot_experts(ids, E)
    rounded = bf16_dot_experts(ids, E, H, I, q8=True)
    ref = moe_experts_reference(x, ids, w, gate_up, down, bf16_activations=rounded, int8_activations=int8)
    assert out.shape == x.shape and out.dtype == np.float32
    rtol = BF16_DOT_RTOL if rounded.any() else RTOL
    tol = np.full(x.shape, rtol * max(1.0, float(np.abs(ref).max(initial=0))))
    for t, j in zip(*np.nonzero(int8[ids])):  # token t's j-th expert streams on int8
        tol[t] += abs(float(w[t, j])) * int8_rounding_allowance(x[t], gate_up[ids[t, j]], down[ids[t, j]], 1e-2)
    assert np.all(np.abs(out - ref) <= tol), f"worst {np.max(np.abs(out - ref) / tol):.3g} x tolerance"
    return out


def check(models, k, x, logits, gate_up, down, bf16=False):
    """Against the float64 reference on the weights the op saw. bf16 weights widen exactly; where the op takes
    its bf16-dot path, the reference rounds the same activations to bf16 and the tolerance is BF16_DOT_RTOL."""
    out, ids, w, gate_up, down = run(models, k, x, logits, gate_up, down, bf16)
    E, H, I = down.shape
    rounded = bf16_dot_experts(ids, E, H, I) if bf16 else np.zeros(E, bool)
    ref = moe_experts_reference(x, ids, w, gate_up, down, bf16_activations=rounded)
    assert out.shape == x.shape and out.dtype == np.float32
    scale = max(1.0, float(np.abs(ref).max(initial=0)))
    np.testing.assert_allclose(out, ref, rtol=0, atol=(BF16_DOT_RTOL if rounded.any() else RTOL) * scale)
    return out, ids, w, gate_up, down


@st.composite
def experts_case(draw):
    bf16 = draw(st.booleans())
    k = BF16_TOP_K if bf16 else draw(st.sampled_from(TOP_K))
    E = draw(st.integers(max(k, 1), 64))
    T = draw(st.one_of(st.sampled_from([0, 1, 2, 5]), st.integers(0, 512)))
    # odd H or I: bf16 weights stream (no bf16 pairs); multiples of 32: the AMX GEMM where present
    H = draw(st.sampled_from([1, 7, 16, 32, 33, 64, 96, 130]))
    I = draw(st.sampled_from([1, 7, 16, 32, 33, 48, 64, 130]))
    if T * max(H, I) * k > 600_000:  # keep one example well under a second
        T = max(1, 600_000 // (max(H, I) * k))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((T, H)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    mode = draw(st.sampled_from(["spread", "one_expert", "few_experts"]))
    if mode == "one_expert":  # every token to the same k experts (one expert gets all tokens)
        logits = np.tile(np.arange(E, dtype=np.float32), (T, 1))
    elif mode == "few_experts":  # most experts get no token
        logits[:, : max(0, E - k - 1)] -= 100
    gate_up = (rng.standard_normal((E, 2 * I, H)) / np.sqrt(H)).astype(np.float32)
    down = (rng.standard_normal((E, H, I)) / np.sqrt(I)).astype(np.float32)
    if draw(st.booleans()) and E > 1:  # duplicate expert weights
        gate_up[1], down[1] = gate_up[0], down[0]
    return k, x, logits, gate_up, down, bf16, draw(st.sampled_from(ISA_MODES))


@given(experts_case())
def test_moe_experts_matches_reference(experts_models, case):
    *args, isa = case
    with pytest.MonkeyPatch.context() as m:
        set_isa(m, isa)
        check(experts_models, *args)


@settings(max_examples=60)
@given(st.integers(Q8_TOP_K, 40), st.one_of(st.sampled_from([0, 1, 2, 5]), st.integers(0, 300)),
       st.sampled_from([32, 64, 96]), st.sampled_from([32, 64, 160]), st.booleans(), st.integers(0, 2**32 - 1),
       st.sampled_from(ISA_MODES))
def test_q8_0_experts_match_reference(experts_models, E, T, H, I, one_expert, seed, isa):
    """Q8_0 expert weights (H and I multiples of 32): experts with few rows stream their int8 blocks (up to 16, or
    up to 256 on the vector lanes where the CPU has AVX512_VNNI), experts with more (one_expert, or large T) take a
    GEMM: the bf16-dot one on the blocks' int8 values where the CPU has AVX512_BF16, else (portable) the
    dequantized float32 matmul, in row chunks that end mid-dim when I = 160 or H = 96. The ISA mode is drawn: the
    streaming experts run vpdpbusd on int8 activations where the CPU has AVX512_VNNI, or widen the int8 weights
    against float32 activations (portable)."""
    if T * max(H, I) * Q8_TOP_K > 600_000:
        T = 600_000 // (max(H, I) * Q8_TOP_K)
    rng = np.random.default_rng(seed)
    logits = np.tile(np.arange(E, dtype=np.float32), (T, 1)) if one_expert else rng.standard_normal((T, E))
    with pytest.MonkeyPatch.context() as m:
        set_isa(m, isa)
        check_q8(experts_models, rng.standard_normal((T, H)).astype(np.float32), logits.astype(np.float32),
                 (rng.standard_normal((E, 2 * I, H)) / np.sqrt(H)).astype(np.float32),
                 (rng.standard_normal((E, H, I)) / np.sqrt(I)).astype(np.float32))


@pytest.mark.skipif(not cpu_has_avx512_vnni(), reason="the CPU has no AVX512_VNNI")
def test_q8_0_vnni_path_is_taken(experts_models, monkeypatch):
    """Where the CPU has AVX512_VNNI, streaming Q8_0 experts run vpdpbusd on int8 activations (a forced portable
    setting in the environment does not turn this into a skip): both paths meet their references and differ."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    rng = np.random.default_rng(4)
    T, E, H, I = 3, 16, 96, 160  # 3 blocks of H: the ymm tail of vpdpbusd; 5 of I
    args = (rng.standard_normal((T, H)).astype(np.float32), rng.standard_normal((T, E)).astype(np.float32),
            (rng.standard_normal((E, 2 * I, H)) / 10).astype(np.float32),
            (rng.standard_normal((E, H, I)) / 13).astype(np.float32))
    assert int8_dot_experts(np.arange(T * Q8_TOP_K) % E, E).all()
    fast = check_q8(experts_models, *args)
    monkeypatch.setenv(PORTABLE_ENV, "1")
    assert not int8_dot_experts(np.arange(T * Q8_TOP_K) % E, E).any()
    exact = check_q8(experts_models, *args)
    assert not np.array_equal(fast, exact), "the vpdpbusd path gave the float32 path's bits"


@pytest.mark.skipif(not cpu_has_avx512_vnni(), reason="the CPU has no AVX512_VNNI")
@pytest.mark.parametrize("rows", [Q8_LANES_MIN_M, Q8_LANES_NARROW_M, Q8_LANES_NARROW_M + 1, 16, 17, 40, 64])
def test_q8_0_lanes_experts(experts_models, monkeypatch, rows):
    """Streaming Q8_0 experts with Q8_LANES_MIN_M to Q8_LANES_MAX_ROWS rows put their int8 rows, then their int8
    SwiGLU outputs, in the vector lanes, in groups of up to 16 rows (8 lanes for a group of up to Q8_LANES_NARROW_M
    rows: 17 and 40 end with one of 1 and 8). Every token routes to the same 8 experts, so each has exactly `rows`
    rows: the outputs meet the int8 reference, and match the row path's (the same tokens in calls of
    Q8_LANES_MIN_M - 1) to float32 summation order, except where a SwiGLU output lies within 1e-3 of an int8 step
    of a rounding boundary (its float32 sums, in another order, may round it the other way; their error is ~2e-5
    of a step): each such element adds |w| * its step * |down column| to its token's tolerance. H 96 and I 160:
    3 and 5 blocks."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    rng = np.random.default_rng(rows)
    E, H, I = 12, 96, 160
    x = rng.standard_normal((rows, H)).astype(np.float32)
    logits = np.tile(np.arange(E, dtype=np.float32), (rows, 1)) + rng.uniform(0, 0.01, (rows, E)).astype(np.float32)
    gate_up = (rng.standard_normal((E, 2 * I, H)) / 10).astype(np.float32)
    down = (rng.standard_normal((E, H, I)) / 13).astype(np.float32)
    lanes = check_q8(experts_models, x, logits, gate_up, down)
    assert np.array_equal(lanes, check_q8(experts_models, x, logits, gate_up, down))
    chunk = Q8_LANES_MIN_M - 1  # tokens a call: every expert below the lanes
    by_rows = np.concatenate([run_q8(experts_models, x[i:i + chunk], logits[i:i + chunk], gate_up, down)[0]
                              for i in range(0, rows, chunk)])
    _, ids, w, gu, dn = run_q8(experts_models, x, logits, gate_up, down)
    tol = np.full(x.shape, 1e-5 * float(np.abs(by_rows).max()))
    for t in range(rows):
        for j in range(Q8_TOP_K):
            tol[t] += abs(float(w[t, j])) * int8_rounding_allowance(x[t], gu[ids[t, j]], dn[ids[t, j]], 1e-3)
    assert np.all(np.abs(lanes - by_rows) <= tol), f"worst {np.max(np.abs(lanes - by_rows) / tol):.3g} x tolerance"


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the CPU has no AVX512_BF16")
def test_q8_0_dot_path_is_taken(experts_models, monkeypatch):
    """Where the CPU has AVX512_BF16, Q8_0 experts with more rows than stream (q8_stream_max_rows) take the bf16-dot
    GEMM (a forced portable setting in the environment does not turn this into a skip): it meets the reference on
    bf16-rounded activations and differs from DEQUANT (the portable choice), which meets it on exact ones. H 288 is
    two K slices of the GEMM (the second one block), I 160 five blocks; 270 tokens over 8 experts give each 270
    rows (six activation blocks, the sixth partial)."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    rng = np.random.default_rng(6)
    T, E, H, I = Q8_LANES_MAX_ROWS + 14, 8, 288, 160
    args = (rng.standard_normal((T, H)).astype(np.float32), rng.standard_normal((T, E)).astype(np.float32),
            (rng.standard_normal((E, 2 * I, H)) / 17).astype(np.float32),
            (rng.standard_normal((E, H, I)) / 13).astype(np.float32))
    ids = np.tile(np.arange(E), (T, 1))
    assert bf16_dot_experts(ids, E, H, I, q8=True).all()
    fast = check_q8(experts_models, *args)
    monkeypatch.setenv(PORTABLE_ENV, "1")
    assert not bf16_dot_experts(ids, E, H, I, q8=True).any()
    exact = check_q8(experts_models, *args)
    assert not np.array_equal(fast, exact), "the bf16-dot GEMM gave DEQUANT's bits"


def test_q8_0_experts_deterministic_and_bad_k_refused(experts_models):
    rng = np.random.default_rng(9)
    T, E, H, I = 200, 16, 64, 96
    args = (rng.standard_normal((T, H)).astype(np.float32), rng.standard_normal((T, E)).astype(np.float32),
            (rng.standard_normal((E, 2 * I, H)) / 8).astype(np.float32), (rng.standard_normal((E, H, I)) / 9).astype(np.float32))
    assert np.array_equal(check_q8(experts_models, *args), check_q8(experts_models, *args))
    x = np.ones((2, 33), np.float32)  # H = 33: no whole Q8_0 blocks
    with pytest.raises(Exception, match="multiples of 32"):
        experts_models[Q8_TOP_K, DType.uint8].execute(x, rng.standard_normal((2, E)).astype(np.float32),
                                                        to_buffer(np.zeros((E, 2 * 32, 34), np.uint8), DType.uint8),
                                                        to_buffer(np.zeros((E, 33, 34), np.uint8), DType.uint8))


@pytest.mark.parametrize("wdt", ["float32", "bfloat16", "q8_0"])
def test_decode_one_task_per_expert(experts_models, wdt):
    """Decode: with every streaming expert at most 4 rows and at least 4 of them a core, each expert is one task
    (gate_up, its SwiGLU outputs quantized, then down, on one core: `_stream_expert`). The first call routes one
    row to each of 4 x cores experts (that regime); the second adds 5 tokens on other experts, one of which then
    has 5 rows, so the same first tokens run the two passes over all experts instead: their outputs must be the
    same bits (the same dots in the same order), and the first call's must meet the reference."""
    import os
    k = {"float32": 8, "bfloat16": BF16_TOP_K, "q8_0": Q8_TOP_K}[wdt]
    T = -(-4 * os.cpu_count() // k)  # tokens: T * k >= 4 x cores experts of one row each
    E, H, I = T * k + k, 96, 160
    rng = np.random.default_rng(3)
    logits = np.full((T + 5, E), -1.0, np.float32)
    for t in range(T):  # token t -> experts t k .. t k + k - 1
        logits[t, t * k:(t + 1) * k] = rng.uniform(1, 2, k)
    logits[T:, T * k:] = rng.uniform(1, 2, (5, k))  # 5 tokens on the last k experts: 5 rows each
    x = rng.standard_normal((T + 5, H)).astype(np.float32)
    gate_up = (rng.standard_normal((E, 2 * I, H)) / 10).astype(np.float32)
    down = (rng.standard_normal((E, H, I)) / 13).astype(np.float32)
    if wdt == "q8_0":
        alone = check_q8(experts_models, x[:T], logits[:T], gate_up, down)
        with_batch = run_q8(experts_models, x, logits, gate_up, down)[0]
    else:
        bf16 = wdt == "bfloat16"
        alone = check(experts_models, k, x[:T], logits[:T], gate_up, down, bf16)[0]
        with_batch = run(experts_models, k, x, logits, gate_up, down, bf16)[0]
    assert np.array_equal(alone, with_batch[:T])


def test_deterministic_bit_for_bit(experts_models):
    rng = np.random.default_rng(5)
    T, E, H, I = 300, 12, 64, 48
    args = (rng.standard_normal((T, H)).astype(np.float32), rng.standard_normal((T, E)).astype(np.float32),
            (rng.standard_normal((E, 2 * I, H)) / 8).astype(np.float32), (rng.standard_normal((E, H, I)) / 7).astype(np.float32))
    for bf16 in (False, True):
        a = run(experts_models, 3, *args, bf16=bf16)[0]
        b = run(experts_models, 3, *args, bf16=bf16)[0]
        assert np.array_equal(a, b)


@pytest.mark.parametrize("T", [1, 4, 5, 64])
@pytest.mark.parametrize("bf16", [False, True])
def test_streaming_matmul_and_dot_paths(experts_models, T, bf16):
    """Experts with <= 4 rows stream their weights; more rows go through MAX's matmul (float32) or the bf16-dot
    GEMM (bfloat16, where the CPU has it; else they stream). All must match the reference. float32 matmul
    experts (T = 64): all tokens to one expert runs it on all cores; each token skipping expert t % 4 gives 4
    experts 48 rows each, an even split, so they run one per core."""
    rng = np.random.default_rng(T)
    E, H, I = 4, 130, 33
    x = rng.standard_normal((T, H)).astype(np.float32)
    gate_up = (rng.standard_normal((E, 2 * I, H)) / 11).astype(np.float32)
    down = (rng.standard_normal((E, H, I)) / 6).astype(np.float32)
    top = np.tile(np.arange(E, dtype=np.float32), (T, 1))  # all tokens to the top experts
    spread = np.zeros((T, E), np.float32)
    spread[np.arange(T), np.arange(T) % E] = -1  # top 3 of 4: every expert but t % 4
    for k, logits in [(BF16_TOP_K, top)] if bf16 else [(1, top), (3, spread)]:
        check(experts_models, k, x, logits, gate_up, down, bf16)


def _heavy_bf16_case(T=70, E=4, H=64, I=48):
    """Every token to the same 3 experts: each has T rows, so the bf16-dot path is taken where available."""
    rng = np.random.default_rng(11)
    return (BF16_TOP_K, rng.standard_normal((T, H)).astype(np.float32), np.tile(np.arange(E, dtype=np.float32), (T, 1)),
            (rng.standard_normal((E, 2 * I, H)) / 8).astype(np.float32), (rng.standard_normal((E, H, I)) / 7).astype(np.float32))


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the CPU has no AVX512_BF16")
@pytest.mark.parametrize("shape", ["small", "hy3"])
def test_bf16_dot_path_rounds_activations(experts_models, monkeypatch, shape):
    """Where the CPU has AVX512_BF16 the bf16-dot path must be taken (a forced portable setting in the environment
    does not turn this into a skip): it matches the reference that rounds activations to bf16, and not the exact
    one at float32 accuracy. `hy3`: Hy3's H 4096 and I 1536, so both GEMMs accumulate over many K slices of
    KC = 128 pairs (32 and 6), which the fuzzed sizes never reach."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    case = _heavy_bf16_case() if shape == "small" else _heavy_bf16_case(T=20, E=3, H=4096, I=1536)
    out, ids, w, gate_up, down = check(experts_models, *case, bf16=True)
    exact = moe_experts_reference(case[1], ids, w, gate_up, down)
    assert np.abs(out - exact).max() > RTOL * max(1.0, float(np.abs(exact).max()))


@pytest.mark.parametrize("shape", ["small", "hy3"])
def test_amx_path_is_taken(experts_models, amx, monkeypatch, shape):
    """Where the CPU has AMX the experts' bf16 GEMMs run on it (HYV3_REQUIRE_AMX=1: or fail): they meet the
    reference that rounds activations to bf16, like the vdpbf16ps GEMM (HYV3_DISABLE_AMX=1), whose sums differ
    from them in the last bits. `small`: 70 rows an expert (five 16-token tiles: a lone last one), I = 32 (a
    tail row block); `hy3`: H 4096 and I 1536, many K slices."""
    case = (_heavy_bf16_case(H=64, I=32) if shape == "small" else _heavy_bf16_case(T=40, E=3, H=4096, I=1536))
    E, H, I = case[4].shape
    assert bf16_gemm(H, I) == "amx"
    out = check(experts_models, *case, bf16=True)[0]
    monkeypatch.setenv(DISABLE_AMX_ENV, "1")
    assert bf16_gemm(H, I) == "dot"
    dot = check(experts_models, *case, bf16=True)[0]
    assert not np.array_equal(out, dot), "the AMX GEMM gave the vdpbf16ps GEMM's bits"


def test_forced_portable_path_is_exact(experts_models, portable):
    """HYV3_PORTABLE_KERNELS=1 (read on every call) takes the portable path, as on a CPU without AVX512_BF16:
    bf16 weights widen exactly and activations stay float32, so the float32 tolerance holds."""
    assert not bf16_dot_available()
    check(experts_models, *_heavy_bf16_case(), bf16=True)
