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
def test_json_output(tiny_path, engines):
    engines.get(tiny_path)  # same graph (conftest's engine settings): a MAX cache hit in the subprocess
    r = run("--model-path", str(tiny_path), "--prompt", "def forward(self", "--prompt-ids", "5,6,7",
            "--max-new-tokens", "5", "--ignore-eos", "--max-length", "256", "--max-batch-size", "4", "--page-size", "16", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert len(lines) == 3
    assert lines[0]["prompt_ids"] == [5, 6, 7]  # --prompt-ids come first, then --prompt
    for obj in lines[:2]:
        assert len(obj["output_ids"]) == 5 and isinstance(obj["text"], str)
    stats = lines[2]["stats"]
    assert {"compile_s", "prefill_tok_s", "decode_tok_s"} <= stats.keys()


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
