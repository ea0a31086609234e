"""A 2-layer slice of Hy3-preview at its exact dims (1 dense + 1 sparse layer, 192 experts, vocab 120832; 9.9 GB
of bf16 weights used, plus the MTP layer to drop): it loads without a second copy, generates, and both backends
agree. Marked `scale` (and `slow`): ~17.6 GB generated once into the cache, two whole-model compiles, ~10 GB
mapped; `make test-scale` runs it, the default `make test` does not."""

import numpy as np
import pytest
from max.dtype import DType

from hyv3_graph.checkpoints import real_slice_checkpoint
from hyv3_graph.generate import generate
from hyv3_graph.runtime import AnonPeak, HYV3Engine

pytestmark = [pytest.mark.slow, pytest.mark.scale]
PROMPT = [int(t) for t in np.random.default_rng(7).integers(2, 120832, 16)]
NEW = 6


@pytest.fixture(scope="module")
def slice_path():
    return real_slice_checkpoint(2, progress=print)


@pytest.fixture(scope="module")
def custom_run(slice_path):
    with AnonPeak() as peak:
        engine = HYV3Engine(slice_path, kernels="custom", max_batch_size=1, max_length=256, progress=print)
        out, stats = generate(engine, [PROMPT], max_new_tokens=NEW, ignore_eos=True)
    return engine, out[0], stats, peak


def test_loads_in_bf16_without_a_second_copy(custom_run):
    engine, tokens, stats, peak = custom_run
    assert engine.dtype == DType.bfloat16  # --dtype auto: the checkpoint's own
    assert len(tokens) == NEW and not stats["errors"]
    print(f"weights {engine.weight_bytes / 1e9:.2f} GB ({engine.mapped_weight_bytes / 1e9:.2f} mapped), RssAnon "
          f"{peak.start / 1e9:.2f} -> peak {peak.peak / 1e9:.2f} GB, load {engine.load_s:.1f}s")
    assert engine.mapped_weight_bytes >= 0.99 * engine.weight_bytes  # only the fp32 router is converted
    assert peak.peak <= 1.1 * engine.weight_bytes  # the bound
    # and the copy is really gone: what loading, compiling and running add is the KV cache, activations and MAX's
    # compiler, far below the weights
    assert peak.peak - peak.start <= 0.3 * engine.weight_bytes


def test_custom_and_builtin_agree_on_greedy_tokens(slice_path, custom_run):
    _, tokens, _, _ = custom_run
    builtin = HYV3Engine(slice_path, kernels="builtin", max_batch_size=1, max_length=256)
    out, _ = generate(builtin, [PROMPT], max_new_tokens=NEW, ignore_eos=True)
    assert out[0] == tokens
