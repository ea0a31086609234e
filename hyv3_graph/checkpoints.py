"""Embedded random-weight checkpoints (`tiny` for tests and the default `generate`, `small` for benchmarks), and
`real_slice`: N layers of the real Hy3-preview at its exact dims (`real_slice_checkpoint`).

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
import time
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .dtypes import f32_to_bf16_bits
from .safetensors_io import write_safetensors

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
# Hy3-preview's own dims (its config.json), for `real_slice_checkpoint`.
REAL_DIMS = dict(
    vocab_size=120832, hidden_size=4096, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
    intermediate_size=13312, moe_intermediate_size=1536, num_experts=192, num_experts_per_tok=8, num_shared_experts=1,
    router_scaling_factor=2.826, rope_theta=11158840.0, max_position_embeddings=262144,
)
_SHARD_BYTES = 4 << 30  # the real checkpoint's shards are a few GB each
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


def real_slice_spec(n_layers: int) -> dict:
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"a real slice has n_layers >= 1 (layer 0 dense, then sparse), got {n_layers!r}")
    return dict(REAL_DIMS, num_hidden_layers=n_layers)


def real_slice_tensors(config: dict) -> list[tuple[str, str, tuple[int, ...], float]]:
    """[(name, safetensors dtype, shape, std)] of an N-layer slice in the raw layout, plus the MTP layer at index N
    (a sparse decoder layer with `enorm`, `hnorm`, `eh_proj`, as Hy3 ships it; the loader must drop it). std 0 marks
    an RMSNorm weight (1 + 0.1 noise). All bf16 but the fp32 expert bias, as in the published checkpoint."""
    H, V, D = config["hidden_size"], config["vocab_size"], config["head_dim"]
    Hq, Hkv, Id = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    E, I = config["num_experts"], config["moe_intermediate_size"]
    S, n = I * config["num_shared_experts"], config["num_hidden_layers"]
    t = [("model.embed_tokens.weight", "BF16", (V, H), 1.0), ("model.norm.weight", "BF16", (H,), 0.0),
         ("lm_head.weight", "BF16", (V, H), 4.0 / H ** 0.5)]
    for i, kind in enumerate(config["mlp_layer_types"] + ["sparse"]):
        p = f"model.layers.{i}."
        t += [(p + "input_layernorm.weight", "BF16", (H,), 0.0), (p + "post_attention_layernorm.weight", "BF16", (H,), 0.0),
              (p + "self_attn.q_proj.weight", "BF16", (Hq * D, H), H ** -0.5),
              (p + "self_attn.k_proj.weight", "BF16", (Hkv * D, H), H ** -0.5),
              (p + "self_attn.v_proj.weight", "BF16", (Hkv * D, H), H ** -0.5),
              (p + "self_attn.o_proj.weight", "BF16", (H, Hq * D), 0.5 * (Hq * D) ** -0.5),
              (p + "self_attn.q_norm.weight", "BF16", (D,), 0.0), (p + "self_attn.k_norm.weight", "BF16", (D,), 0.0)]
        if kind == "dense":
            t += [(p + "mlp.gate_proj.weight", "BF16", (Id, H), H ** -0.5), (p + "mlp.up_proj.weight", "BF16", (Id, H), H ** -0.5),
                  (p + "mlp.down_proj.weight", "BF16", (H, Id), 0.5 * Id ** -0.5)]
            continue
        t += [(p + "mlp.router.gate.weight", "BF16", (E, H), 2.0 * H ** -0.5), (p + "mlp.expert_bias", "F32", (E,), 0.05),
              (p + "mlp.shared_mlp.gate_proj.weight", "BF16", (S, H), H ** -0.5),
              (p + "mlp.shared_mlp.up_proj.weight", "BF16", (S, H), H ** -0.5),
              (p + "mlp.shared_mlp.down_proj.weight", "BF16", (H, S), 0.5 * S ** -0.5)]
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t += [(q + "gate_proj.weight", "BF16", (I, H), H ** -0.5), (q + "up_proj.weight", "BF16", (I, H), H ** -0.5),
                  (q + "down_proj.weight", "BF16", (H, I), 0.5 * I ** -0.5)]
        if i == n:
            t += [(p + "enorm.weight", "BF16", (H,), 0.0), (p + "hnorm.weight", "BF16", (H,), 0.0),
                  (p + "eh_proj.weight", "BF16", (H, 2 * H), (2 * H) ** -0.5)]
    return sorted(t)  # name order, as in the published shards (expert 0, 1, 10, 100, ...)


def _fill_random(view: np.ndarray, std: float, rng: np.random.Generator) -> None:
    """Deterministic random values of RMS ~`std` into `view`, in 16M-element chunks (bounded memory).

    bf16 is built from random bits (a few GB/s, where numpy's normal draws run at ~0.1 G/s and the slice holds
    billions of weights): random sign and 7 mantissa bits, the exponent spread over 4 octaves, for an RMS of
    7.04 x 2^(e - 127), e chosen to hit `std` within a factor of sqrt(2). std 0 = an RMSNorm weight, 1 + 0.1 N(0, 1)."""
    flat = view.reshape(-1)
    if std == 0.0:
        flat[:] = f32_to_bf16_bits(1.0 + 0.1 * rng.standard_normal(flat.size, dtype=np.float32))
        return
    if view.dtype == np.float32:
        flat[:] = std * rng.standard_normal(flat.size, dtype=np.float32)
        return
    e0 = np.uint16(127 + round(np.log2(std / 7.04)))
    chunk = 1 << 24
    for lo in range(0, flat.size, chunk):
        n = min(chunk, flat.size - lo)
        r = rng.bit_generator.random_raw(-(-n // 4)).view(np.uint16)[:n]
        flat[lo:lo + n] = (r & np.uint16(0x807F)) | ((((r >> np.uint16(7)) & np.uint16(3)) + e0) << np.uint16(7))


def real_slice_config(n_layers: int) -> dict:
    return dict(hf_config_dict(real_slice_spec(n_layers)), dtype="bfloat16")


def real_slice_checkpoint(n_layers: int = 2, progress=None) -> Path:
    """An `n_layers` slice of Hy3-preview at its exact dims (layer 0 dense, then sparse), random bf16 weights in the
    raw layout, sharded (~4 GB shards and a model.safetensors.index.json), with the MTP layer at index `n_layers`;
    ~2 GB plus 7.4 GB per sparse layer, plus 7.4 GB for the MTP layer. Its tokenizer is trained like `tiny`'s: the
    text at hand yields far fewer than 120832 tokens, so the ids above its last are never produced by text (prompts
    of random ids use them all); llama.cpp needs one in its GGUF. Deterministic, generated without torch (~0.3 GB/s
    here), written once and then reused from the cache; a killed run resumes at its first missing shard."""
    config = real_slice_config(n_layers)
    key = hashlib.sha256(json.dumps([config, _GENERATOR_VERSION], sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / f"real_slice{n_layers}-{key}"
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".partial")  # kept across a killed run: finished shards are reused
    specs = real_slice_tensors(config)
    std = {name: sd for name, _, _, sd in specs}
    write_sharded(tmp, config, [spec[:3] for spec in specs], lambda name, view: _fill_random(
        view, std[name], np.random.default_rng([zlib.crc32(name.encode()), n_layers])), progress)
    write_tokenizer(tmp, config["vocab_size"])
    tmp.rename(path)
    return path


def write_sharded(path: Path, config: dict, specs: list[tuple[str, str, tuple[int, ...]]], fill, progress=None) -> None:
    """config.json + `specs` ([(name, safetensors dtype, shape)], in order) in shards of up to ~4 GB with a
    model.safetensors.index.json, each tensor's values written by `fill(name, view)` (`write_safetensors`). Shards
    already complete in `path` are kept (resume); config.json is written last."""
    say = progress or (lambda msg: None)
    path.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[2])) * (4 if spec[1] == "F32" else 2)
        if cur and size + nbytes > _SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(spec)
        size += nbytes
    shards.append(cur)
    weight_map = {}
    for s, shard in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        weight_map |= {name: fname for name, _, _ in shard}
        if (path / fname).exists():
            continue
        t0 = time.perf_counter()
        write_safetensors(path / fname, shard, fill)
        say(f"wrote {path.name}/{fname} ({(path / fname).stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s)")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    import sys

    print(real_slice_checkpoint(int(sys.argv[1]) if len(sys.argv) > 1 else 2, progress=lambda m: print(m, file=sys.stderr)))
