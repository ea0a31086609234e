"""A Hy3 checkpoint (safetensors, either naming) -> a GGUF that llama.cpp's native `hy_v3` architecture loads.

    python -m hyv3_graph.gguf_export MODEL_DIR OUT.gguf --type f32|bf16|q8_0

Why our own converter: llama.cpp's `convert_hf_to_gguf.py` needs torch and its own gguf-py (PyPI's
gguf 0.19.0 has no HY_V3 enum), and refuses our embedded tokenizer (its pre-tokenizer hash is not in its
table). This one writes the `hy_v3` architecture string and keys directly with `gguf.GGUFWriter`:

- keys (`hy_v3.` prefix): the config's dims, `expert_gating_func` = sigmoid, `expert_weights_norm` /
  `expert_weights_scale` from `route_norm` / `router_scaling_factor`; a layer is dense when it has no
  `ffn_gate_inp` tensor, so any dense/sparse pattern carries over;
- tensors: one rename table (`_LAYER_TENSORS`); the raw layout's per-expert tensors stacked into
  `ffn_{gate,up,down}_exps` [E, ...]; the MTP layer (`model.layers.{num_hidden_layers}.*`) dropped;
- dtypes: norms, the router (`ffn_gate_inp`) and its correction bias (`exp_probs_b`) stay F32 in every
  variant (a lower-precision router changes which experts win); the rest is F32, BF16 (round to nearest
  even, as ggml does) or Q8_0 (blocks of 32 along each row, one fp16 scale: `q8_0.quantize`, bit-identical to
  llama.cpp's own reference quantizer, and the bytes our ops take). A row length that is not a multiple of 32 stays F32 in a q8_0 file;
- the tokenizer: byte-level BPE as `gpt2` with pre-tokenizer `gpt-2`, padded with unused tokens up to the
  model's vocab size (llama.cpp requires the two to match); its chat template when it has one.

Tensors are streamed: the header is written from the shapes, then each tensor is converted and written
in turn, so memory holds one tensor at a time, never the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import q8_0
from .config import ConfigError, HYV3Config
from .dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from .weights import _RENAMES, CheckpointReader, WeightError, validate_checkpoint

ARCH = "hy_v3"
FORMAT_VERSION = 1  # bump when what is written changes: cached GGUFs are keyed by it
TYPES = ("f32", "bf16", "q8_0")

# Our per-layer checkpoint names (raw naming, before `_RENAMES`) -> GGUF names under `blk.{i}.`.
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.expert_bias": "exp_probs_b",  # llama.cpp names it without a `.bias` suffix
    "mlp.shared.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared.down_proj.weight": "ffn_down_shexp.weight",
}
_EXPERTS = {"gate": "ffn_gate_exps.weight", "up": "ffn_up_exps.weight", "down": "ffn_down_exps.weight"}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}
_ROUTER = "ffn_gate_inp.weight"  # stays F32, like every 1-D tensor (norms, exp_probs_b)


class GGUFExportError(ValueError):
    """The checkpoint cannot be written as a hy_v3 GGUF."""


@dataclass
class _Planned:
    gguf_name: str
    shape: tuple[int, ...]  # numpy order (GGUF stores it reversed)
    qtype: str  # "F32" | "BF16" | "Q8_0"
    read: object  # () -> float32 array of `shape`


def _ggml_type(gguf_name: str, shape: tuple[int, ...], out_type: str) -> str:
    if len(shape) == 1 or gguf_name.endswith(_ROUTER) or out_type == "f32":
        return "F32"
    if out_type == "bf16":
        return "BF16"
    return "Q8_0" if shape[-1] % q8_0.BLOCK == 0 else "F32"


def _plan(reader: CheckpointReader, cfg: HYV3Config, naming: str, out_type: str) -> list[_Planned]:
    """Every tensor llama.cpp reads, in file order, with a reader that yields it in float32."""
    def f32(name):
        return lambda: _as_f32(reader.read(name))

    ren = _RENAMES[naming]
    out = []
    for src, dst in _GLOBAL_TENSORS.items():
        if src == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output.weight
        out.append((dst, reader.meta(src)[1], f32(src)))
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    for i in range(cfg.num_hidden_layers):
        src, blk = f"model.layers.{i}.", f"blk.{i}."
        for ours, dst in _LAYER_TENSORS.items():
            name = src + next((ours.replace(k, v, 1) for k, v in ren.items() if ours.startswith(k)), ours)
            if name in reader.tensors:
                out.append((blk + dst, reader.meta(name)[1], f32(name)))
        if not cfg.is_sparse(i):
            continue
        H = cfg.hidden_size
        if naming == "hf_fused":
            gate_up = src + "mlp.experts.gate_up_proj"
            out += [(blk + _EXPERTS["gate"], (E, I, H), lambda n=gate_up: _as_f32(reader.read(n)[:, :I])),
                    (blk + _EXPERTS["up"], (E, I, H), lambda n=gate_up: _as_f32(reader.read(n)[:, I:])),
                    (blk + _EXPERTS["down"], (E, H, I), f32(src + "mlp.experts.down_proj"))]
        else:
            for part, dst in _EXPERTS.items():
                names = [f"{src}mlp.experts.{e}.{part}_proj.weight" for e in range(E)]
                shape = (E, *reader.meta(names[0])[1])
                out.append((blk + dst, shape, lambda ns=names: np.stack([_as_f32(reader.read(n)) for n in ns])))
    return [_Planned(name, tuple(shape), _ggml_type(name, tuple(shape), out_type), read) for name, shape, read in out]


def _as_f32(a: np.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(a) if a.dtype == np.uint16 else np.asarray(a, np.float32)


def _encode(t: _Planned, data: np.ndarray) -> np.ndarray:
    if t.qtype == "F32":
        return np.ascontiguousarray(data, np.float32)
    if t.qtype == "BF16":
        return f32_to_bf16_bits(data)
    return q8_0.quantize(data)


def _byte_shape(t: _Planned) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as the writer takes it, numpy dtype, bytes) of the encoded tensor, without encoding it."""
    n = int(np.prod(t.shape))
    if t.qtype == "F32":
        return t.shape, np.dtype(np.float32), 4 * n
    if t.qtype == "BF16":
        return t.shape, np.dtype(np.uint16), 2 * n
    row_bytes = q8_0.row_bytes(t.shape[-1])
    return (*t.shape[:-1], row_bytes), np.dtype(np.uint8), n // t.shape[-1] * row_bytes


def _tokenizer(model_path: Path, vocab_size: int) -> dict | None:
    """tokens / token types / merges from a byte-level BPE tokenizer.json, padded to `vocab_size`."""
    f = model_path / "tokenizer.json"
    if not f.exists():
        return None
    tj = json.loads(f.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{f}: only byte-level BPE tokenizers are exported, found {model.get('type')!r}")
    vocab = dict(model["vocab"])
    special = set()
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special.add(t["id"])
    if max(vocab.values(), default=-1) >= vocab_size:
        raise GGUFExportError(f"{f}: token ids reach {max(vocab.values())}, the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED
    for text, i in vocab.items():
        tokens[i], types[i] = text, (3 if i in special else 1)  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    chat_template = None
    tc = model_path / "tokenizer_config.json"
    if tc.exists():
        chat_template = json.loads(tc.read_text()).get("chat_template")
    if chat_template is None and (model_path / "chat_template.jinja").exists():
        chat_template = (model_path / "chat_template.jinja").read_text()
    return {"tokens": tokens, "types": types, "merges": merges, "chat_template": chat_template}


def export_gguf(model_path: str | Path, out_path: str | Path, out_type: str = "f32", progress=None) -> Path:
    """Writes `out_path` (through a temporary file, renamed at the end); returns it."""
    import gguf

    if out_type not in TYPES:
        raise GGUFExportError(f"type must be one of {TYPES}, got {out_type!r}")
    model_path, out_path = Path(model_path), Path(out_path)
    cfg = HYV3Config.from_file(model_path)
    reader = CheckpointReader(model_path)
    naming = validate_checkpoint(reader, cfg)  # the loader's own checks; the MTP layer is left out there too
    planned = _plan(reader, cfg, naming, out_type)

    tmp = out_path.with_name(out_path.name + ".partial")
    w = gguf.GGUFWriter(tmp, ARCH)
    _write_keys(w, cfg, out_type, model_path.name)
    tok = _tokenizer(model_path, cfg.vocab_size)
    if tok is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        if cfg.bos_token_id is not None:
            w.add_bos_token_id(cfg.bos_token_id)
        if cfg.eos_token_ids:
            w.add_eos_token_id(cfg.eos_token_ids[0])
        w.add_add_bos_token(False)  # as our tokenizer: plain text gets no BOS
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
    for t in planned:
        shape, dtype, nbytes = _byte_shape(t)
        w.add_tensor_info(t.gguf_name, shape, dtype, nbytes, raw_dtype=getattr(gguf.GGMLQuantizationType, t.qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for n, t in enumerate(planned):
        data = _encode(t, t.read())
        assert data.nbytes == _byte_shape(t)[2], t.gguf_name
        w.write_tensor_data(data)
        if progress:
            progress(n + 1, len(planned), t.gguf_name)
    w.close()
    tmp.rename(out_path)
    return out_path


def _write_keys(w, cfg: HYV3Config, out_type: str, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type])
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(cfg.shared_intermediate_size)
    w.add_expert_weights_norm(cfg.route_norm)
    w.add_expert_weights_scale(cfg.router_scaling_factor)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyv3_graph.gguf_export", description=__doc__.split("\n")[0])
    ap.add_argument("model_path", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", choices=TYPES, default="bf16")
    args = ap.parse_args(argv)
    try:
        export_gguf(args.model_path, args.out, args.type,
                    progress=lambda i, n, name: print(f"[{i}/{n}] {name}", file=sys.stderr, flush=True))
    except (ConfigError, WeightError, GGUFExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
