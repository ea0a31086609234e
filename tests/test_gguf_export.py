"""`hyv3_graph.gguf_export` read back with the `gguf` package: keys, names, shapes, dtypes and values (no llama.cpp
needed); with llama-cpp-python installed, llama.cpp's f32 logits on our GGUF equal HF fp32's and a wrong GGUF
fails the bench's check."""


import json

import numpy as np
import pytest

from hyv3_graph import gguf_export
from hyv3_graph.checkpoints import embedded_checkpoint, hf_config_dict, random_tensors, write_checkpoint, write_tokenizer
from hyv3_graph.config import HYV3Config
from hyv3_graph.dtypes import f32_to_bf16_bits

gguf = pytest.importorskip("gguf")

SPEC = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=5, num_experts_per_tok=2,
            num_shared_experts=2, router_scaling_factor=1.7, rope_theta=500000.0, max_position_embeddings=512,
            mlp_layer_types=["sparse", "dense", "sparse"], route_norm=False)


@pytest.fixture(scope="module")
def raw_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw")
    config = hf_config_dict(SPEC)
    tensors = random_tensors(config, seed=3)
    tensors["model.layers.3.eh_proj.weight"] = np.ones((64, 128), np.float32)  # an MTP layer: dropped
    write_checkpoint(path, config, tensors, shards=2)
    write_tokenizer(path, config["vocab_size"])
    return path, tensors


def read(path):
    r = gguf.GGUFReader(path)
    keys = {f.name: f.contents() for f in r.fields.values()}
    tensors = {t.name: t for t in r.tensors}
    return keys, tensors


def expected_names(cfg):
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        names |= {b + n for n in ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                  "attn_output.weight", "attn_q_norm.weight", "attn_k_norm.weight", "ffn_norm.weight")}
        if cfg.is_sparse(i):
            names |= {b + n for n in ("ffn_gate_inp.weight", "exp_probs_b", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                                      "ffn_down_exps.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight",
                                      "ffn_down_shexp.weight")}
        else:
            names |= {b + n for n in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")}
    return names


def source(tensors, gguf_name):
    """The checkpoint tensor (float32, numpy order) that a GGUF tensor holds."""
    table = {v: k for k, v in gguf_export._GLOBAL_TENSORS.items()}
    if gguf_name in table:
        return tensors[table[gguf_name]]
    _, i, rest = gguf_name.split(".", 2)
    p = f"model.layers.{i}."
    for part, name in gguf_export._EXPERTS.items():
        if rest == name:
            return np.stack([tensors[f"{p}mlp.experts.{e}.{part}_proj.weight"] for e in range(SPEC["num_experts"])])
    ours = {v: k for k, v in gguf_export._LAYER_TENSORS.items()}[rest]
    raw = ours.replace("mlp.router.weight", "mlp.router.gate.weight").replace("mlp.shared.", "mlp.shared_mlp.")
    return tensors[p + raw]


@pytest.mark.parametrize("out_type", gguf_export.TYPES)
def test_round_trip(raw_ckpt, tmp_path, out_type):
    path, tensors = raw_ckpt
    cfg = HYV3Config.from_file(path)
    out = gguf_export.export_gguf(path, tmp_path / "m.gguf", out_type)
    keys, got = read(out)
    assert keys["general.architecture"] == "hy_v3"
    a = "hy_v3."
    assert (keys[a + "block_count"], keys[a + "embedding_length"], keys[a + "feed_forward_length"]) == (3, 64, 96)
    assert (keys[a + "attention.head_count"], keys[a + "attention.head_count_kv"], keys[a + "attention.key_length"],
            keys[a + "rope.dimension_count"]) == (4, 2, 16, 16)
    assert (keys[a + "expert_count"], keys[a + "expert_used_count"], keys[a + "expert_feed_forward_length"],
            keys[a + "expert_shared_feed_forward_length"]) == (5, 2, 32, 64)
    assert keys[a + "expert_gating_func"] == 2 and keys[a + "expert_weights_norm"] is False
    assert keys[a + "expert_weights_scale"] == pytest.approx(1.7) and keys[a + "rope.freq_base"] == pytest.approx(5e5)
    assert keys[a + "context_length"] == 512 and keys["tokenizer.ggml.pre"] == "gpt-2"
    assert len(keys["tokenizer.ggml.tokens"]) == cfg.vocab_size and "hy_Assistant" in keys["tokenizer.chat_template"]
    special = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    assert all(keys["tokenizer.ggml.token_type"][t["id"]] == 3 for t in special)  # CONTROL
    assert set(got) == expected_names(cfg)  # the MTP layer is gone, dense layer 1 has no router
    for name, t in got.items():
        src = source(tensors, name)
        assert tuple(int(d) for d in t.shape) == src.shape[::-1], name  # GGUF stores ggml's reversed order
        keep_f32 = src.ndim == 1 or name.endswith(("ffn_gate_inp.weight", "exp_probs_b"))
        qtype = "F32" if keep_f32 or out_type == "f32" else {"bf16": "BF16", "q8_0": "Q8_0"}[out_type]
        assert t.tensor_type.name == qtype, name
        data = np.asarray(t.data)
        if qtype == "F32":
            np.testing.assert_array_equal(data.reshape(src.shape), src, err_msg=name)
        elif qtype == "BF16":
            np.testing.assert_array_equal(data.view(np.uint16).reshape(src.shape), f32_to_bf16_bits(src), err_msg=name)
        else:  # llama.cpp's reference quantizer, bit for bit; and within half a step (+ the fp16 scale's rounding)
            expect = gguf.quants.quantize(src, gguf.GGMLQuantizationType.Q8_0)
            np.testing.assert_array_equal(data.reshape(expect.shape), expect, err_msg=name)
            back = gguf.quants.dequantize(expect, gguf.GGMLQuantizationType.Q8_0).reshape(src.shape)
            step = np.abs(src.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(back - src).reshape(-1, 32) <= (0.5 + 127 * 2.0**-11) * step * (1 + 1e-6)), name


def test_fused_naming_writes_the_same_tensors(raw_ckpt, tmp_path):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    path, _ = raw_ckpt
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors")
    (fused / "config.json").write_text((path / "config.json").read_text())
    _, a = read(gguf_export.export_gguf(path, tmp_path / "raw.gguf", "bf16"))
    _, b = read(gguf_export.export_gguf(fused, tmp_path / "fused.gguf", "bf16"))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f32(tmp_path):
    spec = dict(SPEC, hidden_size=48, moe_intermediate_size=40)  # 48 = 1.5 blocks, 40 = 1.25 blocks
    config = hf_config_dict(spec)
    write_checkpoint(tmp_path / "c", config, random_tensors(config, seed=0))
    _, got = read(gguf_export.export_gguf(tmp_path / "c", tmp_path / "m.gguf", "q8_0"))
    assert got["blk.0.ffn_gate_exps.weight"].tensor_type.name == "F32"  # rows of H = 48
    assert got["blk.0.attn_output.weight"].tensor_type.name == "Q8_0"  # rows of Hq D = 64


def test_cli_errors(tmp_path, capsys):
    assert gguf_export.main([str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "x.gguf").exists()


# --- with llama.cpp installed ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_peer():
    from bench import llama_cpp_peer

    ok, why = llama_cpp_peer.available()
    if not ok:
        pytest.skip(f"{why}: the bench's llama.cpp rows check this; install with {llama_cpp_peer.INSTALL_HINT}")
    return llama_cpp_peer


def test_llama_cpp_f32_matches_hf_and_a_wrong_gguf_fails_the_check(llama_peer, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from bench.cases import e2e
    from bench.harness import Disagreement

    path = embedded_checkpoint("tiny")
    impls = {("torch", "f32"): e2e._HF(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), torch),
             ("torch", "bf16"): e2e._HF(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(), torch)}
    prompt = np.random.default_rng(0).integers(2, 1024, 64).tolist()

    def peer(gguf_path, wt):
        return llama_peer.LlamaCpp(gguf_path, wt, n_threads=2, n_ctx=256, n_seq_max=1, n_batch=64)

    good = peer(gguf_export.export_gguf(path, tmp_path / "good.gguf", "f32"), "f32")
    checks = e2e._check(impls | {("llama.cpp", "f32"): good}, prompt, prompt[:16], 16)
    assert checks[("llama.cpp", "f32")]["logits_max_err_vs_hf_fp32"] < 2e-4
    swapped = dict(gguf_export._EXPERTS, gate="ffn_up_exps.weight", up="ffn_gate_exps.weight")
    monkeypatch.setattr(gguf_export, "_EXPERTS", swapped)  # gate and up experts exchanged: a wrong GGUF
    bad = peer(gguf_export.export_gguf(path, tmp_path / "bad.gguf", "f32"), "f32")
    with pytest.raises(Disagreement, match="llama.cpp f32"):
        e2e._check(impls | {("llama.cpp", "f32"): bad}, prompt, prompt[:16], 16)
    good.close()
    bad.close()
