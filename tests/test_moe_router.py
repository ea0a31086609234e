"""Fuzz `kernels/moe_router.mojo` against `moe_router_reference` (hyv3_graph/kernels/moe_router.py).

A handful of (k, scale, renormalize) variants are compiled once per session; T and E are symbolic,
so hypothesis varies shapes at run time without recompiling.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from max.driver import CPU
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType

from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.moe_router import moe_router, moe_router_reference, moe_router_scores

VARIANTS = [  # (top_k, scale, renormalize)
    (1, 1.0, True),
    (3, 2.826, True),
    (8, 2.826, True),
    (16, 0.5, False),
]
WEIGHT_RTOL = 4e-6  # f32 sigmoid/sum rounding: kernel and numpy differ by a few ulps
KEY_TOL = 1e-5  # keys this close (from different inputs) may legitimately rank either way


@pytest.fixture(scope="session")
def router_models():
    cpu = DeviceRef.CPU()
    session = InferenceSession(devices=[CPU()])
    models = {}
    for k, scale, renorm in VARIANTS:
        with Graph(f"moe_router_k{k}", input_types=[TensorType(DType.float32, ["T", "E"], device=cpu),
                                                    TensorType(DType.float32, ["E"], device=cpu)],
                   custom_extensions=[MOJO_KERNELS]) as g:
            logits, bias = (v.tensor for v in g.inputs)
            g.output(*moe_router(logits, bias, k, scale, renorm))
        models[(k, scale, renorm)] = session.load(g)
    return models


def run(models, variant, logits, bias):
    return [o.to_numpy() for o in models[variant].execute(logits, bias)]


def check(models, variant, logits, bias):
    k, scale, renorm = variant
    ids, w, offsets, slots = run(models, variant, logits, bias)
    T, E = logits.shape
    rid, _, _, _ = moe_router_reference(logits, bias, k, scale, renorm)
    assert ids.shape == (T, k) and w.shape == (T, k) and offsets.shape == (E + 1,) and slots.shape == (T * k,)
    assert ids.dtype == np.int32 and w.dtype == np.float32
    if T == 0:
        assert not offsets.any()
        return
    # valid, distinct experts per token
    assert ((ids >= 0) & (ids < E)).all()
    assert (np.sort(ids, axis=1)[:, 1:] != np.sort(ids, axis=1)[:, :-1]).all()

    scores, key = moe_router_scores(logits, bias)
    got_keys, ref_keys = np.take_along_axis(key, ids, 1), np.take_along_axis(key, rid, 1)
    # the chosen keys are the k largest, in descending order
    np.testing.assert_allclose(got_keys, ref_keys, rtol=KEY_TOL, atol=KEY_TOL)
    # exact ids (tie-break by lower index) wherever no two different inputs have near-equal keys
    order = np.argsort(-key, axis=1, kind="stable")[:, : min(k + 1, E)]
    kk = np.take_along_axis(key, order, 1)
    lg = np.where(np.isnan(logits), -np.inf, logits)  # a NaN logit is the same input as -inf
    same_input = (np.take_along_axis(lg, order[:, 1:], 1) == np.take_along_axis(lg, order[:, :-1], 1)) & \
                 (bias[order[:, 1:]] == bias[order[:, :-1]])
    with np.errstate(invalid="ignore"):
        near = np.abs(kk[:, 1:] - kk[:, :-1]) <= KEY_TOL * np.maximum(1, np.abs(kk[:, :-1]))
    unambiguous = ~(near & ~same_input).any(axis=1)
    np.testing.assert_array_equal(ids[unambiguous], rid[unambiguous])
    # weights: the unbiased scores of the chosen experts, renormalized, scaled
    sel = np.take_along_axis(scores, ids, 1).astype(np.float64)
    expect = sel / (sel.sum(1, keepdims=True) + 1e-20) * scale if renorm else sel * scale
    # atol: sigmoid(-200) is 0 or a denormal (~4e-39) depending on how exp saturates; after the
    # renormalization's + 1e-20 a lone such weight is ~4e-19 instead of 0
    np.testing.assert_allclose(w, expect, rtol=WEIGHT_RTOL, atol=1e-12, equal_nan=True)
    # dispatch metadata: a stable grouping of the slots by expert
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(ids.ravel(), minlength=E))]))
    np.testing.assert_array_equal(slots, np.argsort(ids.ravel(), kind="stable"))


@st.composite
def router_case(draw):
    variant = draw(st.sampled_from(VARIANTS))
    k = variant[0]
    E = draw(st.one_of(st.just(k), st.integers(k, 256)))
    T = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 64), st.integers(0, 4096)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mode = draw(st.sampled_from(["normal", "ties", "saturate", "extreme"]))
    if mode == "normal":
        logits = rng.standard_normal((T, E)) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    elif mode == "ties":  # few distinct values: ties everywhere
        logits = rng.choice(rng.standard_normal(draw(st.integers(1, 3))), size=(T, E))
    elif mode == "saturate":  # sigmoid == 0 or 1 exactly in f32
        logits = rng.choice([-200.0, -30.0, 30.0, 200.0, 0.0], size=(T, E))
    else:  # f32 extremes
        logits = rng.choice([np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny, 0.0, 1.0,
                             np.inf, -np.inf, np.nan], size=(T, E))
    bias_scale = draw(st.sampled_from([0.0, 1e-3, 0.1, 10.0]))
    bias = rng.standard_normal(E) * bias_scale
    if mode == "ties" and draw(st.booleans()):
        bias = rng.choice(bias[:2] if E > 1 else bias, size=E)
    return variant, logits.astype(np.float32), bias.astype(np.float32)


@given(router_case())
def test_moe_router_matches_reference(router_models, case):
    variant, logits, bias = case
    check(router_models, variant, logits, bias)


def test_tie_break_lower_index_wins(router_models):
    variant = (3, 2.826, True)
    logits = np.zeros((2, 10), np.float32)
    bias = np.array([0, 1, 0, 1, 0, 1, 0, 0, 1, 0], np.float32)
    ids, w, _, _ = run(router_models, variant, logits, bias)
    assert ids.tolist() == [[1, 3, 5], [1, 3, 5]]  # equal keys: ascending expert index
    np.testing.assert_allclose(w, np.full((2, 3), 2.826 / 3), rtol=1e-6)


def test_scaling_and_renorm_are_applied(router_models):
    """Regression: engines that dropped routed_scaling_factor lost most of the model's accuracy."""
    rng = np.random.default_rng(3)
    logits, bias = rng.standard_normal((64, 40)).astype(np.float32), np.zeros(40, np.float32)
    _, w, _, _ = run(router_models, (8, 2.826, True), logits, bias)
    np.testing.assert_allclose(w.sum(1), 2.826, rtol=1e-5)
    ids, w, _, _ = run(router_models, (16, 0.5, False), logits, bias)
    np.testing.assert_allclose(w, 0.5 / (1 + np.exp(-np.take_along_axis(logits, ids, 1))), rtol=1e-6)


def test_bias_changes_choice_but_not_weight(router_models):
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
    ids, w, _, _ = run(router_models, (1, 1.0, True), logits, np.array([0, 0, 0, 5], np.float32))
    assert ids.tolist() == [[3]] and w.tolist() == [[1.0]]  # renormalized unbiased score of expert 3


def test_non_finite_inputs_stay_in_bounds(router_models):
    logits = np.full((4, 20), np.nan, np.float32)
    logits[1, 5] = 3.0
    logits[2, 7] = np.inf
    bias = np.zeros(20, np.float32)
    bias[4] = np.nan
    ids, w, offsets, slots = run(router_models, (3, 2.826, True), logits, bias)
    # NaN logits score 0 (as -inf); the NaN-bias expert 4 ranks last; ties by lower index
    assert ids.tolist() == [[0, 1, 2], [5, 0, 1], [7, 0, 1], [0, 1, 2]]
    assert not np.isnan(w).any() and w[1, 0] == np.float32(2.826) and w[2, 0] == np.float32(2.826)
    assert offsets[-1] == 12 and sorted(slots.tolist()) == list(range(12))
