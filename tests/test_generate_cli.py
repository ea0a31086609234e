"""The `python -m hyv3_graph.generate` contract: flags, --json lines, clear errors with a non-zero exit."""

import json

import pytest
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "hyv3_graph.generate", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["custom", "builtin"])
def test_json_output(tiny_path, engines, kernels):
    engines.get(tiny_path, kernels)  # same graph (conftest's engine settings): a MAX cache hit in the subprocess
    r = run("--model-path", str(tiny_path), "--prompt", "def forward(self", "--prompt-ids", "5,6,7", "--kernels", kernels,
            "--max-new-tokens", "5", "--ignore-eos", "--max-length", "256", "--max-batch-size", "4", "--page-size", "16", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert len(lines) == 3
    assert lines[0]["prompt_ids"] == [5, 6, 7]  # --prompt-ids come first, then --prompt
    for obj in lines[:2]:
        assert len(obj["output_ids"]) == 5 and isinstance(obj["text"], str)
    stats = lines[2]["stats"]
    assert {"compile_s", "prefill_tok_s", "decode_tok_s", "ttft_s", "host_us_per_token", "errors"} <= stats.keys()
    assert stats["kernels"] == kernels and stats["errors"] == [] and lines[0]["error"] is None


def test_errors_exit_nonzero_with_one_message(tiny_path):
    for args, msg in [
        (["--prompt-ids", "1,99999"], "outside the vocab"),
        (["--prompt-ids", ""], "empty"),
        (["--prompt-ids", "1,2", "--prompt-ids", "3", "--max-batch-size", "1"], "batch capacity"),
        (["--prompt-ids", "1,2,3", "--max-length", "8", "--max-new-tokens", "6"], "--max-length is 8"),
        (["--model-path", "/nonexistent"], "config file not found"),
    ]:
        r = run(*(["--model-path", str(tiny_path)] if "--model-path" not in args else []), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr


def hf_expert_counts(path, prompt):
    """Tokens per expert per sparse layer as HF fp32 routes the prompt (sigmoid + correction bias, top-k)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    k, E, counts = model.config.num_experts_per_tok, model.config.num_experts, {}
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            def hook(mod, inp, out, i=i):
                x = inp[0].reshape(-1, inp[0].shape[-1])
                keys = torch.sigmoid(x @ mod.gate.weight.T) + mod.e_score_correction_bias
                counts[i] = np.bincount(keys.topk(k, dim=-1).indices.reshape(-1).numpy(), minlength=E).tolist()
            layer.mlp.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.tensor([prompt]))
    return counts


@pytest.mark.slow
def test_expert_stats(tiny_path, tmp_path):
    png = tmp_path / "experts.png"
    prompt = [5, 17, 300, 2, 9, 77, 31]
    r = run("--model-path", str(tiny_path), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "6",
            "--ignore-eos", "--max-length", "256", "--max-batch-size", "4", "--page-size", "16", "--json",
            "--expert-stats", str(png))
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout.strip().splitlines()[-1])["stats"]["expert_counts"]
    assert counts["layers"] == [1, 2, 3]  # tiny: layer 0 dense
    hf = hf_expert_counts(tiny_path, prompt)
    assert counts["prefill"] == [hf[i] for i in counts["layers"]]  # the same routing as HF, expert by expert
    assert all(sum(row) == 5 * 4 for row in counts["decode"])  # 5 decode steps x top-4
    assert png.stat().st_size > 1000 and "busiest" in r.stderr
