import json

import pytest

from hyv3_graph.checkpoints import PRESETS, hf_config_dict
from hyv3_graph.config import ConfigError, HYV3Config

# The real Hy3-preview config.json shape: top-level rope_theta, first_k_dense_replace, extra fields.
REAL_HY3 = {
    "architectures": ["HYV3ForCausalLM"], "model_type": "hy_v3", "vocab_size": 120832, "hidden_size": 4096,
    "intermediate_size": 13312, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_dim": 128, "moe_intermediate_size": 1536, "num_experts": 192, "num_experts_per_tok": 8,
    "num_shared_experts": 1, "router_scaling_factor": 2.826, "route_norm": True, "first_k_dense_replace": 1,
    "rope_theta": 11158840.0, "max_position_embeddings": 262144, "rms_norm_eps": 1e-5, "num_nextn_predict_layers": 1,
    "qk_norm": True, "enable_lm_head_fp32": True, "tie_word_embeddings": False, "bos_token_id": 120000,
    "eos_token_id": [120020, 120025],
}


def write(tmp_path, d):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def test_real_hy3_config(tmp_path):
    cfg = HYV3Config.from_file(write(tmp_path, REAL_HY3))
    assert cfg.mlp_layer_types == ("dense",) + ("sparse",) * 79
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.rope_theta) == (192, 8, 11158840.0)
    assert cfg.eos_token_ids == (120020, 120025) and cfg.route_norm and cfg.enable_moe_fp32_combine


def test_config_written_by_transformers(tmp_path):
    from transformers import HYV3Config as HFConfig

    spec = dict(PRESETS["tiny"], mlp_layer_types=["sparse", "dense", "sparse", "dense"], num_local_experts=16)
    spec.pop("num_experts")
    theta = spec.pop("rope_theta")
    HFConfig(**spec, rope_parameters={"rope_type": "default", "rope_theta": theta}).save_pretrained(tmp_path)
    cfg = HYV3Config.from_file(tmp_path)
    assert cfg.mlp_layer_types == ("sparse", "dense", "sparse", "dense")
    assert cfg.num_experts == 16 and cfg.rope_theta == theta


def test_num_local_experts_alias_and_default_dense_prefix():
    d = dict(REAL_HY3, num_local_experts=12, num_hidden_layers=3)
    del d["num_experts"], d["first_k_dense_replace"]
    cfg = HYV3Config.from_dict(d)
    assert cfg.num_experts == 12 and cfg.mlp_layer_types == ("dense", "sparse", "sparse")


@pytest.mark.parametrize("field", ["hidden_size", "num_key_value_heads", "rms_norm_eps", "vocab_size", "head_dim"])
def test_missing_field_names_field_and_file(tmp_path, field):
    d = dict(REAL_HY3)
    del d[field]
    with pytest.raises(ConfigError, match=rf"config.json: field '{field}': missing"):
        HYV3Config.from_file(write(tmp_path, d))


def test_missing_rope_theta(tmp_path):
    d = dict(REAL_HY3)
    del d["rope_theta"]
    with pytest.raises(ConfigError, match="rope_theta"):
        HYV3Config.from_file(write(tmp_path, d))


@pytest.mark.parametrize("field,value,why", [
    ("num_key_value_heads", 7, "does not divide"),
    ("num_experts_per_tok", 500, "exceeds num_experts"),
    ("hidden_size", "4096", "integer"),
    ("route_norm", "yes", "true/false"),
    ("rms_norm_eps", -1.0, "positive"),
    ("mlp_layer_types", ["dense", "moe"], "dense'/'sparse"),
    ("head_dim", 127, "even"),
])
def test_invalid_field(tmp_path, field, value, why):
    with pytest.raises(ConfigError, match=rf"field '{field}'.*{why}"):
        HYV3Config.from_file(write(tmp_path, dict(REAL_HY3, **{field: value})))


def test_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        HYV3Config.from_file(tmp_path)


def test_presets_are_valid():
    for name, spec in PRESETS.items():
        assert HYV3Config.from_dict(hf_config_dict(spec)).num_hidden_layers == spec["num_hidden_layers"]
