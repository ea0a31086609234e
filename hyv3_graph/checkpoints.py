"""Embedded random-weight checkpoints (`tiny` for tests and the default `generate`, `small` for benchmarks).

Made deterministically from a fixed seed with numpy + safetensors (no torch), in the raw Hy3
layout with a config.json that transformers' `HYV3ForCausalLM.from_pretrained` loads, plus a
byte-level BPE tokenizer trained with `tokenizers` on source text shipped inside the installed
`transformers` package (no downloads). Written once to a cache folder and reused.

The weights are random: generated text is meaningless. The spreads are chosen so that logits
and expert scores are well separated (greedy parity with HF is then not at the mercy of ties)
and the expert correction bias is non-zero (a bias that never changes a choice tests nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, intermediate_size=512, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
        num_shared_experts=1, router_scaling_factor=2.826, rope_theta=10000.0, max_position_embeddings=4096,
    ),
    "small": dict(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
        head_dim=64, intermediate_size=2048, moe_intermediate_size=256, num_experts=64, num_experts_per_tok=8,
        num_shared_experts=1, router_scaling_factor=2.826, rope_theta=11158840.0, max_position_embeddings=8192,
    ),
}
_GENERATOR_VERSION = 2  # bump when the generated content changes, so caches are rebuilt
BOS, EOS = "<|bos|>", "<|eos|>"
USER, ASSISTANT = "<｜hy_User｜>", "<｜hy_Assistant｜>"  # Hy3's role tokens (fullwidth bars)
# A small chat template in Hy3's style: BOS, an optional system text, role tokens before each turn, EOS after each
# assistant turn, and `reasoning_effort` (no_think | low | high) deciding how the assistant's turn opens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT +
    "{% if reasoning_effort is defined and reasoning_effort == 'no_think' %}<think>\n\n</think>\n\n"
    "{% elif reasoning_effort is defined and reasoning_effort in ('low', 'high') %}<think:{{ reasoning_effort }}>\n"
    "{% endif %}{% endif %}"
)


def hf_config_dict(spec: dict) -> dict:
    """A config.json in the shape `HYV3Config.save_pretrained` writes."""
    spec = dict(spec)
    theta = spec.pop("rope_theta")
    n = spec["num_hidden_layers"]
    spec.setdefault("mlp_layer_types", ["dense"] + ["sparse"] * (n - 1))
    return {
        "architectures": ["HYV3ForCausalLM"], "model_type": "hy_v3", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "enable_moe_fp32_combine": True,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, "attention_bias": False, "mlp_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "dtype": "float32",
        **spec,
    }


def random_tensors(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Raw-Hy3-layout tensors for `config`, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    H, V, D = config["hidden_size"], config["vocab_size"], config["head_dim"]
    Hq, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    E, I = config["num_experts"], config["moe_intermediate_size"]
    S = I * config.get("num_shared_experts", 1)

    def w(*shape, fan_in=None, gain=1.0):
        std = gain / np.sqrt(fan_in if fan_in is not None else shape[-1])
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, H, fan_in=1), "model.norm.weight": norm(H)}
    if not config.get("tie_word_embeddings", False):
        t["lm_head.weight"] = w(V, H, gain=4.0)  # logit std ~4: well-separated argmax
    for i, kind in enumerate(config["mlp_layer_types"]):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": norm(H), p + "post_attention_layernorm.weight": norm(H),
            p + "self_attn.q_proj.weight": w(Hq * D, H), p + "self_attn.k_proj.weight": w(Hkv * D, H),
            p + "self_attn.v_proj.weight": w(Hkv * D, H), p + "self_attn.o_proj.weight": w(H, Hq * D, gain=0.5),
            p + "self_attn.q_norm.weight": norm(D), p + "self_attn.k_norm.weight": norm(D),
        }
        if kind == "dense":
            Id = config["intermediate_size"]
            t |= {p + "mlp.gate_proj.weight": w(Id, H), p + "mlp.up_proj.weight": w(Id, H),
                  p + "mlp.down_proj.weight": w(H, Id, gain=0.5)}
            continue
        t[p + "mlp.router.gate.weight"] = w(E, H, gain=2.0)  # sigmoid scores spread over (0, 1)
        t[p + "mlp.expert_bias"] = (0.05 * rng.standard_normal(E)).astype(np.float32)
        if S:
            t |= {p + "mlp.shared_mlp.gate_proj.weight": w(S, H), p + "mlp.shared_mlp.up_proj.weight": w(S, H),
                  p + "mlp.shared_mlp.down_proj.weight": w(H, S, gain=0.5)}
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t |= {q + "gate_proj.weight": w(I, H), q + "up_proj.weight": w(I, H), q + "down_proj.weight": w(H, I, gain=0.5)}
    return t


def write_checkpoint(path: Path, config: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> None:
    """config.json + safetensors, one file or `shards` files with a model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n] for n in names}, path / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for s, chunk in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, path / fname, metadata={"format": "pt"})
        weight_map |= {n: fname for n in chunk}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """Byte-level BPE trained on transformers' own source text, with Hy3-style role tokens and chat template, saved
    for `AutoTokenizer`. It adds no BOS of its own to plain text (no post-processor); the chat template writes one."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = Path(transformers.__file__).parent
    corpus = [f.read_text(errors="ignore") for f in sorted((root / "models" / "llama").glob("*.py"))]
    corpus += [(root / "generation" / "utils.py").read_text(errors="ignore")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   additional_special_tokens=[USER, ASSISTANT])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def cache_root() -> Path:
    return Path(os.environ.get("HYV3_CACHE", Path.home() / ".cache" / "hyv3-max"))


def embedded_checkpoint(name: str = "tiny") -> Path:
    """Path of the embedded checkpoint `name`, generating it on first use."""
    if name not in PRESETS:
        raise ValueError(f"unknown embedded checkpoint {name!r}; choose from {sorted(PRESETS)}")
    config = hf_config_dict(PRESETS[name])
    key = hashlib.sha256(json.dumps([config, _GENERATOR_VERSION], sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / f"{name}-{key}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{name}-"))
    try:  # write aside, then rename: a killed run never leaves a half-written checkpoint behind
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
        write_tokenizer(tmp, config["vocab_size"])
        write_checkpoint(tmp, config, random_tensors(config, seed))
        tmp.rename(path)
    except OSError:
        if not (path / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
