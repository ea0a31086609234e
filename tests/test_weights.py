import json

import numpy as np
import pytest
from max.dtype import DType

from hyv3_graph.checkpoints import hf_config_dict, random_tensors, write_checkpoint
from hyv3_graph.config import HYV3Config
from hyv3_graph.dtypes import bf16_rounded, f32_to_bf16_bits
from hyv3_graph.weights import WeightError, load_weights

SPEC = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=5, num_experts_per_tok=2,
            num_shared_experts=1, router_scaling_factor=2.0, rope_theta=10000.0, max_position_embeddings=128,
            mlp_layer_types=["dense", "sparse", "sparse"])


def make(tmp_path, spec=SPEC, mutate=None, shards=1):
    config = hf_config_dict(spec)
    tensors = random_tensors(config, seed=1)
    if mutate:
        mutate(tensors)
    write_checkpoint(tmp_path, config, tensors, shards=shards)
    return HYV3Config.from_file(tmp_path), tensors


def test_raw_layout_stacks_experts_and_keeps_router_fp32(tmp_path):
    cfg, t = make(tmp_path)
    w = load_weights(tmp_path, cfg, DType.bfloat16).tensors
    gu = w["layers.1.mlp.experts.gate_up"]
    assert gu.shape == (5, 32, 32) and gu.dtype == np.uint16  # bf16 bits
    np.testing.assert_array_equal(gu[3, :16], f32_to_bf16_bits(t["model.layers.1.mlp.experts.3.gate_proj.weight"]))
    np.testing.assert_array_equal(gu[3, 16:], f32_to_bf16_bits(t["model.layers.1.mlp.experts.3.up_proj.weight"]))
    assert w["layers.1.mlp.expert_bias"].dtype == np.float32
    np.testing.assert_array_equal(w["layers.1.mlp.expert_bias"], t["model.layers.1.mlp.expert_bias"])
    assert w["layers.2.mlp.router.weight"].dtype == np.float32
    assert w["layers.0.self_attn.qkv_proj.weight"].shape == ((4 + 2 + 2) * 8, 32)


def test_equals_what_transformers_loads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, _ = make(tmp_path)
    ours = load_weights(tmp_path, cfg).tensors
    sd = {k: v.float().numpy() for k, v in AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict().items()}
    for i in (1, 2):
        p = f"model.layers.{i}.mlp."
        np.testing.assert_array_equal(ours[f"layers.{i}.mlp.experts.gate_up"], sd[p + "experts.gate_up_proj"])
        np.testing.assert_array_equal(ours[f"layers.{i}.mlp.experts.down"], sd[p + "experts.down_proj"])
        np.testing.assert_array_equal(ours[f"layers.{i}.mlp.router.weight"], sd[p + "gate.weight"])
        np.testing.assert_array_equal(ours[f"layers.{i}.mlp.expert_bias"], sd[p + "e_score_correction_bias"])
        np.testing.assert_array_equal(ours[f"layers.{i}.mlp.shared.down_proj.weight"], sd[p + "shared_experts.down_proj.weight"])
    qkv = np.concatenate([sd[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"])
    np.testing.assert_array_equal(ours["layers.0.self_attn.qkv_proj.weight"], qkv)
    np.testing.assert_array_equal(ours["lm_head.weight"], sd["lm_head.weight"])
    np.testing.assert_array_equal(ours["embed_tokens.weight"], sd["model.embed_tokens.weight"])


def test_hf_fused_naming_matches_raw(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, _ = make(tmp_path / "raw")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "raw", dtype=torch.float32)
    from safetensors.torch import save_file

    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors")
    (fused / "config.json").write_text((tmp_path / "raw" / "config.json").read_text())
    a, b = load_weights(tmp_path / "raw", cfg), load_weights(fused, cfg)
    assert (a.naming, b.naming) == ("raw", "hf_fused")
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k], err_msg=k)


def test_sharded_index(tmp_path):
    cfg, _ = make(tmp_path / "one")
    make(tmp_path / "sharded", shards=3)
    assert len(json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    a, b = load_weights(tmp_path / "one", cfg), load_weights(tmp_path / "sharded", cfg)
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k])


def test_tied_embeddings_use_embed_tokens(tmp_path):
    cfg, t = make(tmp_path, dict(SPEC, tie_word_embeddings=True))
    assert "lm_head.weight" not in t
    w = load_weights(tmp_path, cfg).tensors
    assert w["lm_head.weight"] is w["embed_tokens.weight"]


def test_mtp_layer_dropped(tmp_path):
    def add_mtp(t):
        t["model.layers.3.input_layernorm.weight"] = np.ones(32, np.float32)
        t["model.layers.3.eh_proj.weight"] = np.ones((32, 64), np.float32)

    cfg, _ = make(tmp_path, mutate=add_mtp)
    assert not any(k.startswith("layers.3.") for k in load_weights(tmp_path, cfg).tensors)


def test_bf16_checkpoint(tmp_path):
    import torch
    from safetensors.torch import save_file

    cfg, t = make(tmp_path / "f32")
    bf = tmp_path / "bf16"
    bf.mkdir()
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in t.items()}, bf / "model.safetensors")
    (bf / "config.json").write_text((tmp_path / "f32" / "config.json").read_text())
    w = load_weights(bf, cfg, DType.float32).tensors
    expect = bf16_rounded(t["model.layers.1.mlp.experts.2.down_proj.weight"])
    np.testing.assert_array_equal(w["layers.1.mlp.experts.down"][2], expect)


def _set(name, value):
    return lambda t: t.__setitem__(name, value)


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.pop("model.layers.2.mlp.experts.4.up_proj.weight"),
     r"missing tensor 'model.layers.2.mlp.experts.4.up_proj.weight' \(expected shape \[16, 32\]\)"),
    (_set("model.layers.1.mlp.extra.weight", np.ones(3, np.float32)),
     r"unexpected tensor 'model.layers.1.mlp.extra.weight' \(shape \[3\]\)"),
    (_set("model.layers.1.mlp.expert_bias", np.ones(6, np.float32)),
     r"'model.layers.1.mlp.expert_bias': expected shape \[5\], found \[6\]"),
    (_set("model.norm.weight", np.ones(32, np.int32)), r"'model.norm.weight': expected a float dtype.*found I32"),
    (_set("model.layers.1.mlp.experts.gate_up_proj", np.ones((5, 32, 32), np.float32)), "mixes"),
], ids=["missing", "unexpected", "misshaped", "non_float", "mixed_namings"])
def test_bad_checkpoint_is_one_clear_error(tmp_path, mutate, message):
    cfg, _ = make(tmp_path, mutate=mutate)
    with pytest.raises(WeightError, match=message):
        load_weights(tmp_path, cfg)


def test_tiny_checkpoint_loads_in_transformers(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert type(model).__name__ == "HYV3ForCausalLM"
    tok = AutoTokenizer.from_pretrained(tiny_path)
    ids = tok.encode("def forward(self, x):", add_special_tokens=False)
    assert tok.decode(ids) == "def forward(self, x):" and max(ids) < model.config.vocab_size
    bias = load_weights(tiny_path, HYV3Config.from_file(tiny_path)).tensors["layers.1.mlp.expert_bias"]
    assert np.abs(bias).max() > 0


def _bf16_checkpoint(tmp_path, spec=SPEC):
    """`spec` written with bf16 tensors (the router and expert bias too, as in the real Hy3 but the bias)."""
    config = dict(hf_config_dict(spec), dtype="bfloat16")
    t = {k: (v if k.endswith("expert_bias") else f32_to_bf16_bits(v)) for k, v in random_tensors(config, seed=1).items()}
    from hyv3_graph.safetensors_io import st_dtype, write_safetensors

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    names = sorted(t)
    write_safetensors(tmp_path / "model.safetensors", [(n, st_dtype(t[n].dtype), t[n].shape) for n in names],
                      lambda n, view: view.__setitem__(..., t[n]))
    return HYV3Config.from_file(tmp_path), t


def test_bf16_weights_are_views_of_files_not_copies(tmp_path):
    from hyv3_graph.dtypes import buffer_numpy, to_buffer
    from hyv3_graph.weights import _is_mapped

    cfg, t = _bf16_checkpoint(tmp_path / "ckpt")
    w = load_weights(tmp_path / "ckpt", cfg, DType.bfloat16, prepared_root=tmp_path / "prepared")
    copied = {k for k, a in w.tensors.items() if not _is_mapped(a)}
    assert copied == {f"layers.{i}.mlp.router.weight" for i in (1, 2)}  # bf16 in the file, fp32 in the graph
    assert w.mapped_bytes == w.nbytes - sum(w.tensors[k].nbytes for k in copied)
    gu = w.tensors["layers.2.mlp.experts.gate_up"]
    np.testing.assert_array_equal(gu[4, 16:], t["model.layers.2.mlp.experts.4.up_proj.weight"])
    emb = w.tensors["embed_tokens.weight"]
    assert buffer_numpy(to_buffer(emb, DType.bfloat16)).ctypes.data == emb.ctypes.data  # MAX gets the mapping itself


def test_prepared_layout_is_made_once_and_resumes(tmp_path):
    cfg, _ = make(tmp_path / "ckpt")
    root = tmp_path / "prepared"
    first = load_weights(tmp_path / "ckpt", cfg, DType.bfloat16, prepared_root=root)
    files = sorted(first.prepared.glob("layer-*.safetensors"))
    assert [f.name for f in files] == ["layer-000.safetensors", "layer-001.safetensors", "layer-002.safetensors"]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    expect = {k: np.array(a) for k, a in first.tensors.items()}  # copies: the mapped files are damaged next
    del first.tensors
    files[1].unlink()  # a conversion killed after layer 0
    with open(files[2], "r+b") as fh:  # and a damaged file
        fh.truncate(100)
    again = load_weights(tmp_path / "ckpt", cfg, DType.bfloat16, prepared_root=root)
    assert again.prepared == first.prepared and files[0].stat().st_mtime_ns == stamps[files[0]]
    for k in expect:
        np.testing.assert_array_equal(expect[k], again.tensors[k], err_msg=k)
    other = load_weights(tmp_path / "ckpt", cfg, DType.float32, prepared_root=root)
    assert other.prepared != first.prepared  # one folder per model dtype


def test_q8_0_prepared_layout_is_mapped_quantized_bytes(tmp_path):
    """quant="q8_0": fused qkv and the stacked experts are prepared once as Q8_0 bytes (a folder of their own) and
    mapped; the other matmul weights are quantized at load; the router stays float32."""
    from hyv3_graph import q8_0
    from hyv3_graph.weights import _is_mapped

    cfg, t = make(tmp_path / "ckpt", dict(SPEC, intermediate_size=64, moe_intermediate_size=32))
    root = tmp_path / "prepared"
    w = load_weights(tmp_path / "ckpt", cfg, DType.float32, prepared_root=root, quant="q8_0",
                     prepared_dtype=DType.float32)
    gu = w.tensors["layers.1.mlp.experts.gate_up"]
    assert gu.dtype == np.uint8 and gu.shape == (5, 64, q8_0.row_bytes(32)) and _is_mapped(gu)
    np.testing.assert_array_equal(gu[3, 32:], q8_0.quantize(t["model.layers.1.mlp.experts.3.up_proj.weight"]))
    np.testing.assert_array_equal(w.tensors["layers.2.mlp.experts.down"][4],
                                  q8_0.quantize(t["model.layers.2.mlp.experts.4.down_proj.weight"]))
    qkv = w.tensors["layers.0.self_attn.qkv_proj.weight"]
    assert _is_mapped(qkv)
    np.testing.assert_array_equal(qkv, q8_0.quantize(np.concatenate(
        [t[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"])))
    o = w.tensors["layers.0.self_attn.o_proj.weight"]
    assert o.dtype == np.uint8 and not _is_mapped(o)  # quantized at load
    assert w.tensors["layers.1.mlp.router.weight"].dtype == np.float32
    again = load_weights(tmp_path / "ckpt", cfg, DType.float32, prepared_root=root, quant="q8_0",
                         prepared_dtype=DType.float32)
    assert again.prepared == w.prepared
    np.testing.assert_array_equal(again.tensors["layers.1.mlp.experts.gate_up"], gu)
    assert load_weights(tmp_path / "ckpt", cfg, DType.float32, prepared_root=root).prepared != w.prepared


@pytest.mark.parametrize("change,message", [
    (lambda d, s: ("I16", s), r"'model.layers.1.mlp.experts.117.up_proj.weight': expected a float dtype.*found I16"),
    (lambda d, s: (d, (s[0], s[1] + 1)),
     r"'model.layers.1.mlp.experts.117.up_proj.weight': expected shape \[1536, 4096\], found \[1536, 4097\]"),
], ids=["dtype", "shape"])
def test_real_slice_bad_expert_tensor_is_one_error_naming_it(tmp_path, change, message):
    """The real slice's 576 expert tensors, headers only (sparse files: no data is written or read)."""
    from hyv3_graph.checkpoints import real_slice_config, real_slice_tensors, write_sharded

    config = real_slice_config(2)
    bad = "model.layers.1.mlp.experts.117.up_proj.weight"
    specs = [(n, *change(d, s)) if n == bad else (n, d, s) for n, d, s, _ in real_slice_tensors(config)]
    write_sharded(tmp_path, config, specs, lambda name, view: None)
    with pytest.raises(WeightError, match=message):
        load_weights(tmp_path, HYV3Config.from_file(tmp_path), DType.bfloat16, prepared_root=tmp_path / "prepared")
