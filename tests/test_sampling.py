"""`hyv3_graph.sampling` against a float64 reference: the same support (top-k, top-p) and the same distribution."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyv3_graph.sampling import SamplingError, _draw, _nucleus, check_sampling, sample


def reference_probs(logits, temperature, top_k, top_p):
    """The textbook definition, float64, full sorts: top-k, softmax, the smallest prefix reaching top_p."""
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        z[np.argsort(-z, kind="stable")[top_k:]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.lexsort((np.arange(p.size), -p))
        keep = np.cumsum(p[order]) - p[order] < top_p
        p[order[~keep]] = 0
        p /= p.sum()
    return p


@given(st.integers(1, 3000), st.integers(0, 2**31), st.sampled_from([0.3, 1.0, 2.5]),
       st.sampled_from([0, 1, 5, 64, 10_000]), st.sampled_from([1.0, 0.9, 0.5, 0.05]))
def test_support_matches_reference(V, seed, temperature, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(V) * 3).astype(np.float32)
    ref = reference_probs(logits, temperature, top_k, top_p)
    draws = {sample(logits, rng, temperature, top_k, top_p) for _ in range(20)}
    assert all(ref[d] > 0 for d in draws), (sorted(draws), np.flatnonzero(ref))


@given(st.integers(1, 5000), st.integers(0, 2**31), st.floats(0.01, 1.0))
def test_nucleus_is_the_smallest_prefix(n, seed, top_p):
    p = np.random.default_rng(seed).random(n).astype(np.float32) ** 4
    keep = _nucleus(p, top_p)
    order = np.lexsort((np.arange(n), -p))
    assert list(keep) == list(order[:keep.size])
    mass = np.cumsum(p[order], dtype=np.float64)
    target = top_p * p.sum(dtype=np.float64)
    assert mass[keep.size - 1] >= target * (1 - 1e-6)
    assert keep.size == 1 or mass[keep.size - 2] < target * (1 + 1e-6)


@given(st.integers(1, 300_000), st.integers(0, 2**31), st.floats(0, 1, exclude_max=True))
def test_draw_finds_the_crossing(n, seed, u):
    p = np.random.default_rng(seed).random(n).astype(np.float32)
    i = _draw(p, u)
    cdf = np.cumsum(p, dtype=np.float64)
    target = u * cdf[-1]
    tol = 1e-9 * cdf[-1]
    assert (cdf[i - 1] if i else 0.0) <= target + tol and target <= cdf[i] + tol


def test_distribution_matches_reference():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(40) * 2).astype(np.float32)
    for args in [(0.7, 0, 1.0), (1.0, 10, 1.0), (1.3, 0, 0.8), (1.0, 12, 0.6)]:
        ref = reference_probs(logits, *args)
        n = 40_000
        counts = np.bincount([sample(logits, rng, *args) for _ in range(n)], minlength=40)
        assert np.all(counts[ref == 0] == 0)
        sd = np.sqrt(n * ref * (1 - ref)) + 1
        assert np.all(np.abs(counts - n * ref) <= 5 * sd), args


def test_greedy_and_determinism():
    logits = np.random.default_rng(0).standard_normal(120_832).astype(np.float32)
    assert sample(logits, None, 0.0, 0, 1.0) == int(np.argmax(logits))
    a = [sample(logits, np.random.default_rng(5), 0.8, 50, 0.9) for _ in range(3)]
    assert len(set(a)) == 1


@pytest.mark.parametrize("args", [(float("nan"), 0, 1.0), (-1.0, 0, 1.0), (float("inf"), 0, 1.0), (1.0, -1, 1.0),
                                  (1.0, 0, 0.0), (1.0, 0, 1.5), (1.0, 0, float("nan")), (1.0, True, 1.0)])
def test_bad_parameters(args):
    with pytest.raises(SamplingError):
        check_sampling(*args)
