"""`attention` cases: kernels/attention.mojo vs MAX's flash_attention_ragged vs torch SDPA on a padded batch.

Hy3 heads (Hq = 64, Hkv = 8, D = 128), float32, pages of 128, on one paged cache in MAX's layout:
(a) ragged prefill of new lengths [1, 37, 300, 1024] into empty caches; (b) the same over cache lengths
[512, 0, 100, 2048]; (c) decode of 16 sequences with cache lengths spread over 100..4000, in float32 and
in bfloat16. Ours takes the raw QKV projection and also does the q/k norms, RoPE and the K/V store; the
peers get the normed, rotated queries and the keys/values already in place and time attention alone
(MAX's on the same cache buffers, torch on the history gathered into a padded [B, H, L, D] batch with a
causal+padding mask, as an HF user runs it). Rooflines: FLOPs 4 D Hq sum(n c + n (n + 1) / 2) for
prefill; for decode the K/V bytes read, (c + 1) Hkv D 2 per sequence.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from max.driver import CPU
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType, ops
from max.nn.attention import MHAMaskVariant
from max.nn.kernels import flash_attention_ragged

from hyv3_graph.checkpoints import PRESETS, hf_config_dict
from hyv3_graph.config import HYV3Config
from hyv3_graph.dtypes import buffer_numpy, to_buffer, to_dtype
from hyv3_graph.kernels import MOJO_KERNELS
from hyv3_graph.kernels.attention import attention, rotated_reference, token_positions
from hyv3_graph.kv_cache import PagedKVCache
from hyv3_graph.model import rope_freqs_cis

from ..harness import Case, assert_close, run_case

BENCH = "attention"
EPS = 1e-5
FULL = dict(heads=dict(num_attention_heads=64, num_key_value_heads=8, head_dim=128), page=128, steps=[
    ("prefill", [0, 0, 0, 0], [1, 37, 300, 1024], DType.float32),
    ("prefill_cached", [512, 0, 100, 2048], [1, 37, 300, 1024], DType.float32),
    ("decode16", [int(c) for c in np.linspace(100, 4000, 16)], [1] * 16, DType.float32),
    ("decode16", [int(c) for c in np.linspace(100, 4000, 16)], [1] * 16, DType.bfloat16),
])
QUICK = dict(heads=dict(num_attention_heads=8, num_key_value_heads=2, head_dim=64), page=16, steps=[
    ("prefill_cached", [20, 0, 50], [1, 37, 100], DType.float32),
    ("decode4", [100, 200, 300, 400], [1] * 4, DType.bfloat16),
])


def _config(heads: dict, max_len: int) -> HYV3Config:
    return HYV3Config.from_dict(hf_config_dict({**PRESETS["small"], **heads, "num_hidden_layers": 1,
                                                "max_position_embeddings": max_len}))


def _graphs(session, cache: PagedKVCache, dt: DType, cfg: HYV3Config, n_positions: int):
    cpu, D, Hq = DeviceRef.CPU(), cfg.head_dim, cfg.num_attention_heads
    kv_params = cache.params
    layer = lambda: ops.constant(0, DType.uint32, device=cpu)
    with Graph(f"bench_attention_{dt}", input_types=[
            TensorType(dt, ["T", cfg.q_dim + 2 * cfg.kv_dim], device=cpu), TensorType(dt, [D], device=cpu),
            TensorType(dt, [D], device=cpu), TensorType(DType.float32, [n_positions, D], device=cpu),
            TensorType(DType.uint32, ["B1"], device=cpu), *kv_params.flattened_kv_inputs()],
            custom_extensions=[MOJO_KERNELS]) as g:
        qkv, q_norm, k_norm, freqs, offsets, *kv_inputs = g.inputs
        kv = kv_params.unflatten_kv_inputs(iter(kv_inputs))[0]
        g.output(attention(qkv.tensor, q_norm.tensor, k_norm.tensor, freqs.tensor, offsets.tensor, kv.kv_blocks,
                           kv.cache_lengths, kv.lookup_table, layer(), EPS))
    mojo = session.load(g)
    with Graph(f"bench_flash_attention_ragged_{dt}", input_types=[
            TensorType(dt, ["T", Hq, D], device=cpu), TensorType(DType.uint32, ["B1"], device=cpu),
            *kv_params.flattened_kv_inputs()]) as g:
        q, offsets, *kv_inputs = g.inputs
        kv = kv_params.unflatten_kv_inputs(iter(kv_inputs))[0]
        g.output(flash_attention_ragged(kv_params, input=q.tensor, kv_collection=kv, layer_idx=layer(),
                                        input_row_offsets=offsets.tensor, mask_variant=MHAMaskVariant.CAUSAL_MASK,
                                        scale=D ** -0.5))
    return mojo, session.load(g)


def _case(graphs, torch, cfg, spec, name, cache_lens, new_lens, dt, rng) -> Case:
    Hq, Hkv, D, page = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, spec["page"]
    n_positions = cfg.max_position_embeddings
    B, T = len(cache_lens), sum(new_lens)
    cache = PagedKVCache(cfg, dt, max_batch_size=B, max_length=n_positions, page_size=page)
    for b, c in enumerate(cache_lens):  # history: random K/V in every page a sequence owns
        cache.claim(b)
        cache.reserve([(b, c + new_lens[b])])
        cache.commit([(b, c)])
    view = buffer_numpy(cache.blocks)
    view[...] = to_dtype(rng.standard_normal(view.shape, np.float32), dt)
    steps = [(b, n) for b, n in enumerate(new_lens)]
    kv_inputs = cache.inputs(steps)
    offsets = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.uint32)
    positions = token_positions(offsets, cache_lens)
    freqs = rope_freqs_cis(D, cfg.rope_theta, n_positions)
    qkv32 = rng.standard_normal((T, (Hq + 2 * Hkv) * D), np.float32)
    q_norm32, k_norm32 = (1 + 0.1 * rng.standard_normal((2, D), np.float32)).astype(np.float32)
    as_dt, from_dt = (lambda a: to_dtype(a, dt)), (lambda a: to_dtype(a, DType.float32))
    qkv, q_norm, k_norm = (to_buffer(as_dt(a), dt) for a in (qkv32, q_norm32, k_norm32))
    if dt not in graphs["built"]:
        graphs["built"][dt] = _graphs(graphs["session"], cache, dt, cfg, n_positions)
    mojo, flash = graphs["built"][dt]

    def run_mojo():
        return mojo.execute(qkv, q_norm, k_norm, freqs, offsets, *kv_inputs)[0]

    run_mojo()  # stores this step's K/V: the peers read them from the same cache
    q_rot = rotated_reference(from_dt(as_dt(qkv32))[:, : Hq * D].reshape(T, Hq, D), from_dt(as_dt(q_norm32)),
                              freqs, positions, EPS).astype(np.float32)  # [T, Hq, D]
    q_max = to_buffer(as_dt(q_rot), dt)
    blocks = from_dt(view)[:, :, 0]  # [pages, 2, page, Hkv, D]
    L, Lq = max(c + n for c, n in zip(cache_lens, new_lens)), max(new_lens)
    tdt = torch.bfloat16 if dt == DType.bfloat16 else torch.float32
    k_pad, v_pad = np.zeros((2, B, Hkv, L, D), np.float32)
    q_pad = np.zeros((B, Hq, Lq, D), np.float32)
    mask = np.zeros((B, 1, Lq, L), bool)
    for b, (c, n) in enumerate(zip(cache_lens, new_lens)):
        at = np.arange(c + n)
        kv = blocks[kv_inputs[2][b][at // page], :, at % page]  # [c + n, 2, Hkv, D]
        k_pad[b, :, : c + n], v_pad[b, :, : c + n] = kv[:, 0].transpose(1, 0, 2), kv[:, 1].transpose(1, 0, 2)
        q_pad[b, :, :n] = q_rot[offsets[b]: offsets[b + 1]].transpose(1, 0, 2)
        mask[b, 0, :n, : c + n] = np.arange(c + n)[None, :] <= (c + np.arange(n))[:, None]
        mask[b, 0, n:, 0] = True  # padded query rows: any one key, their output is dropped
    tq, tk, tv = (torch.from_numpy(a).to(tdt) for a in (q_pad, k_pad, v_pad))
    tmask = torch.from_numpy(mask)

    def run_torch():
        with torch.no_grad():
            o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, enable_gqa=True)
        return o

    def unpad(o):  # [B, Hq, Lq, D] -> [T, Hq, D]
        o = o.float().numpy()
        return np.concatenate([o[b, :, :n].transpose(1, 0, 2) for b, n in enumerate(new_lens)])

    def to_f32(buf):
        return from_dt(buffer_numpy(buf))

    def check(outputs):
        """MAX's and torch's outputs within 2e-4 (fp32) / 3e-2 (bf16 cache) x max|V| of ours."""
        ref = to_f32(outputs["mojo"])
        tol = 2e-4 if dt == DType.float32 else 3e-2
        assert_close("attention (max vs mojo)", to_f32(outputs["max"]), ref, rtol=0, atol=tol * np.abs(v_pad).max())
        assert_close("attention (torch vs mojo)", unpad(outputs["torch"]), ref, rtol=0, atol=tol * np.abs(v_pad).max())

    elem = 2 if dt == DType.bfloat16 else 4
    decode = all(n == 1 for n in new_lens)
    flops = 4 * D * Hq * sum(n * c + n * (n + 1) / 2 for c, n in zip(cache_lens, new_lens))
    return Case(
        bench=BENCH, name=f"{name}_Hq{Hq}_Hkv{Hkv}_D{D}_{'bf16' if dt == DType.bfloat16 else 'f32'}",
        impls={"mojo": run_mojo, "max": lambda: flash.execute(q_max, offsets, *kv_inputs)[0], "torch": run_torch},
        check=check, flops=None if decode else flops,
        bytes=sum(c + 1 for c in cache_lens) * Hkv * D * 2 * elem if decode else None,
        versions={"mojo": "kernels/attention.mojo (norms + rope + K/V store + attention)",
                  "max": f"max {version('max')} flash_attention_ragged (attention only)",
                  "torch": f"torch {torch.__version__} scaled_dot_product_attention, padded batch"},
        notes=f"cache {cache_lens}, new {new_lens}, page {page}")


def cases(quick: bool) -> list[Case]:
    import torch

    spec, rng = QUICK if quick else FULL, np.random.default_rng(0)
    # one rope table size for every step, so each dtype's two graphs are compiled once
    cfg = _config(spec["heads"], max(c + n for _, cl, nl, _ in spec["steps"] for c, n in zip(cl, nl)) + 1)
    graphs = {"session": InferenceSession(devices=[CPU()]), "built": {}}
    return [_case(graphs, torch, cfg, spec, *step, rng) for step in spec["steps"]]


def results(quick: bool, machine: dict) -> list[dict]:
    return [row for case in cases(quick) for row in run_case(case, machine)]
