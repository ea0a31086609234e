"""Fuzz `kernels/attention.mojo` against `attention_reference` (float64 over each sequence's full history).

One graph per cache dtype is compiled once per session with every dim symbolic (tokens, batch, heads,
head_dim, page size, pages, layers), so hypothesis varies all shapes at run time without recompiling.
Each example builds a paged cache with random contents and a shuffled page table, runs the op once, and
checks both the output and the whole cache afterwards: the new K/V exactly where they belong, every
other element untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from max.driver import CPU
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import BufferType, DeviceRef, Graph, TensorType

from hyv3_graph.dtypes import buffer_numpy, to_buffer, to_dtype
from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.attention import attention, attention_reference, narrow_queries
from hyv3_graph.kernels.cpu_isa import PORTABLE_ENV, bf16_dot_available, cpu_has_avx512_bf16
from hyv3_graph.model import rope_freqs_cis

EPS = 1e-6
N_POSITIONS = 2048
# Tolerances against the float64 reference, relative to the largest |V| (outputs are convex combinations of V).
# float32 keeps ~1e-6. bf16: the reference rounds where the op does (the inputs, the stored K, the output, and on
# the vdpbf16ps decode path Q and the probabilities), so what is left is one bf16 step of the output where the
# float32 values straddle a rounding boundary (OUT_ULPS, relative to each output) plus the probabilities rounded
# against the op's running max instead of the row's max, and a stored K element a bf16 step off where the op's
# float32 K straddles a boundary (OUT_TOL). Observed over 300 random bf16 cases (2026-12-02): at most 8.2e-4 of
# |V| beyond the one step, on both paths (median 1.2e-4 on bf16 pairs, 1.7e-7 on the portable path); the former
# tolerance without a rounding reference was 4e-2.
OUT_TOL = {DType.float32: 2e-5, DType.bfloat16: 2e-3}
OUT_ULPS = {DType.float32: 0.0, DType.bfloat16: 2.0**-8}
# The stored K against the reference's: float32 to a few ulps; bf16 to one rounding step of |k|.
K_RTOL = {DType.float32: 1e-5, DType.bfloat16: 2 ** -8}


@pytest.fixture(scope="session")
def attention_models():
    cpu, session, models = DeviceRef.CPU(), InferenceSession(devices=[CPU()]), {}
    for dt in (DType.float32, DType.bfloat16):
        types = [TensorType(dt, ["T", "W"], device=cpu), TensorType(dt, ["D"], device=cpu),
                 TensorType(dt, ["D"], device=cpu), TensorType(DType.float32, ["P", "D"], device=cpu),
                 TensorType(DType.uint32, ["B1"], device=cpu),
                 BufferType(dt, ["pages", 2, "L", "page", "Hkv", "D"], device=cpu),
                 TensorType(DType.uint32, ["B"], device=cpu), TensorType(DType.uint32, ["B", "cols"], device=cpu),
                 TensorType(DType.uint32, [], device=cpu)]
        with Graph(f"attention_{dt}", input_types=types, custom_extensions=[MOJO_KERNELS]) as g:
            qkv, q_norm, k_norm, freqs, offsets, blocks, cache_lens, lut, layer = g.inputs
            g.output(attention(qkv.tensor, q_norm.tensor, k_norm.tensor, freqs.tensor, offsets.tensor, blocks,
                               cache_lens.tensor, lut.tensor, layer.tensor, EPS))
        models[dt] = session.load(g)
    return models


def _as(dt, a):
    """float32 numpy -> (what the op gets, the float64 values it represents)."""
    given = to_dtype(a, dt)
    return given, to_dtype(given, DType.float32).astype(np.float64)


def run_case(models, dt, rng, Hq, Hkv, D, page, cache_lens, new_lens, n_layers=2, layer=1, spare_cols=1):
    B, T = len(cache_lens), sum(new_lens)
    pages_per_seq = [-(-(c + n) // page) for c, n in zip(cache_lens, new_lens)]
    n_pages = sum(pages_per_seq) + 3  # a few pages nobody owns, plus the null page below
    cols = max(pages_per_seq + [0]) + spare_cols
    lut = np.full((B, cols), n_pages, np.uint32)
    order = rng.permutation(n_pages)
    used = 0
    for b, n in enumerate(pages_per_seq):
        lut[b, :n] = order[used: used + n]
        used += n
    blocks, blocks64 = _as(dt, rng.standard_normal((n_pages + 1, 2, n_layers, page, Hkv, D)).astype(np.float32))
    history = []
    for b, c in enumerate(cache_lens):
        at = [(lut[b, p // page], p % page) for p in range(c)]
        history.append(tuple(np.array([blocks64[pg, kind, layer, s] for pg, s in at]).reshape(c, Hkv, D) for kind in (0, 1)))
    qkv, qkv64 = _as(dt, rng.standard_normal((T, (Hq + 2 * Hkv) * D)).astype(np.float32))
    q_norm, q_norm64 = _as(dt, (1 + 0.2 * rng.standard_normal(D)).astype(np.float32))
    k_norm, k_norm64 = _as(dt, (1 + 0.2 * rng.standard_normal(D)).astype(np.float32))
    freqs = rope_freqs_cis(D, 10000.0, N_POSITIONS)
    offsets = np.concatenate([[0], np.cumsum(new_lens, dtype=np.int64)]).astype(np.uint32)

    cache = to_buffer(blocks.copy(), dt)
    out = models[dt].execute(to_buffer(qkv, dt), to_buffer(q_norm, dt), to_buffer(k_norm, dt), freqs, offsets, cache,
                             np.array(cache_lens, np.uint32), lut, np.array(layer, np.uint32))[0]
    rounding = None
    if dt == DType.bfloat16:  # round where the op rounds: stored K, output; Q and P on the bf16-pairs path
        rounding = narrow_queries(offsets, Hq // Hkv) & (D % 32 == 0 and bf16_dot_available())
    ref, new_k, new_v = attention_reference(qkv64, q_norm64, k_norm64, freqs, offsets, history, Hkv, EPS,
                                            bf16_rounding=rounding)
    f64 = lambda buf: to_dtype(buffer_numpy(buf), DType.float32).astype(np.float64)
    out, after = f64(out), f64(cache)

    assert out.shape == (T, Hq, D)
    v_scale = max(1.0, float(np.abs(blocks64[:, 1]).max(initial=0)), float(np.abs(new_v).max(initial=0)))
    ulps = OUT_ULPS[dt] * np.abs(ref)  # rounded outputs may land a bf16 step apart
    excess = np.abs(out - ref) - ulps
    assert excess.max(initial=0) <= OUT_TOL[dt] * v_scale, (excess.max(initial=0) / v_scale, OUT_TOL[dt])

    written = np.zeros(after.shape, bool)
    for b in range(B):
        for i in range(new_lens[b]):
            p, t = cache_lens[b] + i, offsets[b] + i
            pg, s = lut[b, p // page], p % page
            np.testing.assert_allclose(after[pg, 0, layer, s], new_k[t], rtol=K_RTOL[dt], atol=K_RTOL[dt])
            assert np.array_equal(after[pg, 1, layer, s], new_v[t])  # V is stored as given
            written[pg, :, layer, s] = True
    assert np.array_equal(after[~written], blocks64[~written]), "the op changed cache entries it does not own"
    return out


@st.composite
def attention_case(draw):
    Hkv = draw(st.sampled_from([1, 2, 3]))
    Hq = Hkv * draw(st.sampled_from([1, 2, 4, 8]))
    D = draw(st.sampled_from([32, 64, 128]))
    page = draw(st.sampled_from([1, 3, 16, 128]))
    B = draw(st.integers(0, 8))
    mode = draw(st.sampled_from(["prefill", "decode", "mixed"]))
    cache_lens = [0 if mode == "prefill" else draw(st.integers(0, 600)) for _ in range(B)]
    new_lens = [1 if mode == "decode" else draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 300)))
                for _ in range(B)]
    # keep the float64 reference (O(n (c + n) Hq D) per sequence) to a fraction of a second
    budget = 3e7
    while sum(n * (c + n) for c, n in zip(cache_lens, new_lens)) * Hq * D > budget:
        b = max(range(B), key=lambda i: new_lens[i] * (cache_lens[i] + new_lens[i]))
        new_lens[b] //= 2
        cache_lens[b] //= 2
    dt = draw(st.sampled_from([DType.float32, DType.bfloat16]))
    n_layers = draw(st.integers(1, 3))
    return dict(dt=dt, Hq=Hq, Hkv=Hkv, D=D, page=page, cache_lens=cache_lens, new_lens=new_lens, n_layers=n_layers,
                layer=draw(st.integers(0, n_layers - 1)), spare_cols=draw(st.integers(0, 2)),
                rng=np.random.default_rng(draw(st.integers(0, 2**32 - 1))))


@given(attention_case())
def test_attention_matches_reference(attention_models, case):
    run_case(attention_models, **case)


@pytest.mark.parametrize("page", [16, 48])
@pytest.mark.parametrize("dt", [DType.float32, DType.bfloat16])
def test_hy3_heads_long_prefill_over_a_cache(attention_models, dt, page):
    """Hy3's head shape (G = 8, D = 128) across several query tiles and key tiles. Pages of 48 mix key tiles that a
    float32 cache gives in place (within one page) with tiles that cross a page (copied)."""
    run_case(attention_models, dt, np.random.default_rng(1), Hq=16, Hkv=2, D=128, page=page,
             cache_lens=[130, 0, 7], new_lens=[70, 257, 1])


def _hy3_heads_bf16_decode(models):
    return run_case(models, DType.bfloat16, np.random.default_rng(4), Hq=16, Hkv=2, D=128, page=16,
                    cache_lens=[0, 15, 16, 300, 599], new_lens=[1] * 5)


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the CPU has no AVX512_BF16")
def test_bf16_cache_decode_on_bf16_pairs(attention_models, monkeypatch):
    """A bf16 cache's decode items compute on bf16 pairs (vdpbf16ps, Q and P rounded to bf16): within the bf16
    tolerance, and really taken, since the forced portable path (float32 Q and P) gives other values. Where the
    CPU has AVX512_BF16 this must hold: a forced portable setting in the environment does not make it a skip."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    pairs = _hy3_heads_bf16_decode(attention_models)
    monkeypatch.setenv(PORTABLE_ENV, "1")
    assert not np.array_equal(pairs, _hy3_heads_bf16_decode(attention_models))


def test_bf16_cache_decode_forced_portable(attention_models, portable):
    """HYV3_PORTABLE_KERNELS=1, as on a CPU without AVX512_BF16: float32 Q and P over the bf16 cache."""
    _hy3_heads_bf16_decode(attention_models)


def test_decode_batch_mqa(attention_models):
    """1301 keys make three narrow items (KCHUNK = 512 keys each) whose partial softmaxes are combined."""
    run_case(attention_models, DType.float32, np.random.default_rng(2), Hq=8, Hkv=1, D=64, page=3,
             cache_lens=[0, 1, 47, 599, 100, 1300], new_lens=[1] * 6)


def test_empty_batch_and_sequences_without_new_tokens(attention_models):
    rng = np.random.default_rng(3)
    run_case(attention_models, DType.float32, rng, Hq=4, Hkv=2, D=32, page=16, cache_lens=[], new_lens=[])
    run_case(attention_models, DType.float32, rng, Hq=4, Hkv=2, D=32, page=16, cache_lens=[5, 9], new_lens=[0, 0])


def test_bad_page_table_raises_instead_of_reading_out_of_bounds(attention_models):
    dt, D = DType.float32, 32
    blocks = np.zeros((3, 2, 1, 4, 1, D), np.float32)  # 2 pages + null page
    args = lambda lut, cache_len: (np.zeros((1, 3 * D), np.float32), np.ones(D, np.float32), np.ones(D, np.float32),
                                   rope_freqs_cis(D, 10000.0, 16), np.array([0, 1], np.uint32), to_buffer(blocks, dt),
                                   np.array([cache_len], np.uint32), np.array([lut], np.uint32), np.array(0, np.uint32))
    with pytest.raises(ValueError, match="page id out of range"):
        attention_models[dt].execute(*args([7, 0], 0))
    with pytest.raises(ValueError, match="past its pages or the rope table"):
        attention_models[dt].execute(*args([0, 1], 8))  # position 8 needs a third page
    with pytest.raises(ValueError, match="past its pages or the rope table"):
        attention_models[dt].execute(*args([0, 1, 2, 2, 2], 16))  # position 16 is past the rope table
