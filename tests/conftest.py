"""Session fixtures: every whole-model graph is compiled once per test session (minutes when cold)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from hyv3_graph.checkpoints import embedded_checkpoint, hf_config_dict, random_tensors, write_checkpoint
from hyv3_graph.kernels.cpu_isa import DISABLE_AMX_ENV, PORTABLE_ENV, amx_available, amx_required

settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A second Hy3 config unlike `tiny` in every structural way the graph derives from the config:
# MQA (6 q heads, 1 kv head), head_dim 64, 12 experts (not a power of 2) top-3, 2 shared experts,
# a non-prefix dense/sparse pattern, tied embeddings, another scaling factor, shared experts not combined in fp32.
ALT_SPEC = dict(
    vocab_size=512, hidden_size=192, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=1,
    head_dim=64, intermediate_size=320, moe_intermediate_size=96, num_experts=12, num_experts_per_tok=3,
    num_shared_experts=2, router_scaling_factor=1.7, rope_theta=500000.0, max_position_embeddings=2048,
    mlp_layer_types=["sparse", "dense", "sparse"], tie_word_embeddings=True, enable_moe_fp32_combine=False,
)


@pytest.fixture
def portable(monkeypatch):
    """The ops' portable SIMD paths, as on a CPU without AVX512_BF16 (kernels/cpu_isa.mojo reads it on every call)."""
    monkeypatch.setenv(PORTABLE_ENV, "1")


@pytest.fixture
def amx(monkeypatch):
    """The ops' AMX paths must run: skips where the CPU or OS lacks AMX, fails instead under HYV3_REQUIRE_AMX=1
    (so a machine that should have it cannot pass by skipping)."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    monkeypatch.delenv(DISABLE_AMX_ENV, raising=False)
    if not amx_available():
        if amx_required():
            pytest.fail("HYV3_REQUIRE_AMX=1 but the AMX paths cannot run here (no amx_bf16/amx_tile, or not granted)")
        pytest.skip("the CPU has no AMX-BF16 (or Linux does not grant the tile state)")


ISA_MODES = ("default", "no_amx", "portable")  # fuzz tests draw one: every path on one machine


def set_isa(m, mode: str):
    """Sets the kernels' run-time ISA switches in MonkeyPatch m: the default choice (AMX where present), the
    AVX512_BF16 GEMMs instead of AMX, or the portable SIMD paths."""
    m.delenv(PORTABLE_ENV, raising=False)
    m.delenv(DISABLE_AMX_ENV, raising=False)
    if mode == "portable":
        m.setenv(PORTABLE_ENV, "1")
    elif mode == "no_amx":
        m.setenv(DISABLE_AMX_ENV, "1")


@pytest.fixture(scope="session")
def tiny_path():
    return embedded_checkpoint("tiny")


@pytest.fixture(scope="session")
def alt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("alt")
    config = hf_config_dict(ALT_SPEC)
    write_checkpoint(path, config, random_tensors(config, seed=7))
    return path


class EngineCache:
    """One compiled engine per (checkpoint, kernels) for the whole session."""

    def __init__(self):
        self._engines = {}

    def get(self, path, kernels="builtin"):
        from hyv3_graph.runtime import HYV3Engine

        key = (str(path), kernels)
        if key not in self._engines:
            self._engines[key] = HYV3Engine(path, kernels=kernels, max_batch_size=4, max_length=256, page_size=16,
                                            total_pages=40)
        return self._engines[key]


@pytest.fixture(scope="session")
def engines():
    return EngineCache()


@pytest.fixture(scope="session")
def hf_models():
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cache = {}

    def get(path):
        if str(path) not in cache:
            cache[str(path)] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                    attn_implementation="eager").eval()
        return cache[str(path)]

    return get


def hf_last_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0, -1].float().numpy()
