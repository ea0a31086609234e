"""Bad input never ends in a traceback: CLI arguments, damaged checkpoints, non-finite numbers, engine API misuse.

The table runs `hyv3_graph.generate.main` in-process (the same code path as the command, seconds instead of a
process start per row); two rows also run as real processes. Every row must exit 2 with stderr's last line an
`error:` naming the item. None of them compiles a graph: everything is checked before that.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyv3_graph import generate as cli
from hyv3_graph.runtime import RequestError

ROOT = Path(__file__).resolve().parents[1]
ENGINE_FLAGS = ["--max-length", "256", "--max-batch-size", "4", "--page-size", "16"]  # conftest's engine


def run_main(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def _rewrite_header(path: Path, edit) -> None:
    """Edits a safetensors header in place, padding with spaces so the data offsets stay valid."""
    n, header = _header(path)
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n, "edited header must not grow"
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(raw.ljust(n, b" "))


def truncated(ckpt: Path) -> str:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()[:100_000]
    f.write_bytes(data)
    return "model.safetensors"


def corrupted_header(ckpt: Path) -> str:
    f = ckpt / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(20)
        fh.write(b"\xff\x00garbage")
    return "corrupted safetensors header"


def offsets_past_end(ckpt: Path) -> str:
    def edit(h):
        h["model.norm.weight"]["data_offsets"] = [90_000_000, 90_000_000 + 4 * 256]  # past the 26 MB file
    _rewrite_header(ckpt / "model.safetensors", edit)
    return "'model.norm.weight'"


def non_float_tensor(ckpt: Path) -> str:
    def edit(h):
        h["model.layers.2.mlp.experts.3.up_proj.weight"]["dtype"] = "I32"
    _rewrite_header(ckpt / "model.safetensors", edit)
    return "'model.layers.2.mlp.experts.3.up_proj.weight'"


def index_names_missing_file(ckpt: Path) -> str:
    _, header = _header(ckpt / "model.safetensors")
    weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return "model-00002-of-00002.safetensors"


def config_not_json(ckpt: Path) -> str:
    (ckpt / "config.json").write_text("{ this is not json")
    return "config.json"


def too_many_experts_per_token(ckpt: Path) -> str:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_experts_per_tok"] = 99
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return "num_experts_per_tok"


def nan_weight(ckpt: Path) -> str:
    n, header = _header(ckpt / "model.safetensors")
    begin = header["model.layers.1.mlp.shared_mlp.up_proj.weight"]["data_offsets"][0]
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(8 + n + begin + 4 * 37)
        f.write(np.array([np.nan], np.float32).tobytes())
    return "'model.layers.1.mlp.shared_mlp.up_proj.weight': non-finite value (NaN/inf) at flat index 37"


CHECKPOINT_ROWS = [  # (damage, extra flags)
    (truncated, []), (corrupted_header, []), (offsets_past_end, []), (non_float_tensor, []),
    (index_names_missing_file, []), (config_not_json, []), (too_many_experts_per_token, []),
    (nan_weight, ["--check-weights"]),
]

FLAG_ROWS = [  # (flags, what the error line must name)
    (["--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--page-size", "0"], "--page-size"),
    (["--page-size", "x"], "--page-size"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--max-length", "0"], "--max-length"),
    (["--max-length", "99999"], "max_position_embeddings"),
    (["--dtype", "float16"], "--dtype"),
    (["--kernels", "fast"], "--kernels"),
    (["--dtype", "q8_0", "--kernels", "builtin"], "--kernels custom"),
    (["--prompt-ids", "1,a"], "--prompt-ids"),
    (["--prompt-ids", "1,99999"], "outside the vocab"),
    (["--prompt-ids", ""], "empty"),
    (["--prompt-ids", "1,2", "--prompt-ids", "3", "--max-batch-size", "1"], "--max-batch-size"),
    (["--prompt-ids", "1,2,3", "--max-length", "8", "--max-new-tokens", "6"], "--max-length is 8"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file"),
    (["--system", "be brief"], "--chat"),
    (["--interactive", "--json"], "--interactive"),
    (["--model-path", "/nonexistent"], "config file not found"),
    (["--unknown-flag"], "--unknown-flag"),
]


def assert_one_error(code, err, names):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith("error:"), err
    assert names in lines[-1], (names, lines[-1])
    assert "Traceback" not in err


@pytest.mark.parametrize("flags,names", FLAG_ROWS, ids=[" ".join(f)[:40] for f, _ in FLAG_ROWS])
def test_bad_flag_is_one_error_line(tiny_path, capsys, flags, names):
    path = [] if "--model-path" in flags else ["--model-path", str(tiny_path)]
    assert_one_error(*run_main([*path, *flags], capsys), names)


@pytest.mark.parametrize("damage,flags", CHECKPOINT_ROWS, ids=[d.__name__ for d, _ in CHECKPOINT_ROWS])
def test_damaged_checkpoint_is_one_error_line(tiny_path, tmp_path, capsys, damage, flags):
    ckpt = copy_checkpoint(tiny_path, tmp_path / "ckpt")
    names = damage(ckpt)
    assert_one_error(*run_main(["--model-path", str(ckpt), "--prompt-ids", "1,2", *flags], capsys), names)


@pytest.mark.parametrize("damage,flags", [(truncated, []), (None, ["--temperature", "nan"])], ids=["truncated", "nan"])
def test_as_a_real_process(tiny_path, tmp_path, damage, flags):
    ckpt = copy_checkpoint(tiny_path, tmp_path / "ckpt")
    names = damage(ckpt) if damage else "--temperature"
    r = subprocess.run([sys.executable, "-m", "hyv3_graph.generate", "--model-path", str(ckpt), *flags],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert_one_error(r.returncode, r.stderr, names)


# --- random argument vectors: the CLI runs, or exits 2 with one error line ---------------------------------

def _value(valid, invalid):
    return st.one_of(st.sampled_from(valid), st.sampled_from(invalid)) if invalid else st.sampled_from(valid)


ARGS = {  # flag -> (valid values, invalid values); shape flags' valid values are the cached engine's own
    "--max-new-tokens": (["1", "3"], ["0", "-3", "x", "1.5"]),
    "--temperature": (["0", "0.7", "1e-3"], ["nan", "-1", "inf", "hot"]),
    "--top-k": (["0", "1", "5"], ["-1", "k"]),
    "--top-p": (["1", "0.9", "0.01"], ["0", "1.5", "nan", "-0.1"]),
    "--seed": (["0", "7", str(2**64 - 1)], ["-1", str(2**64), "s"]),
    "--max-length": (["256"], ["0", "-5", "99999"]),
    "--page-size": (["16"], ["0", "-1", str(2**20)]),
    "--max-batch-size": (["4"], ["0", "5000"]),
    "--prompt-ids": (["1,2,3", "5", "9,9"], ["", "a", "1,-2", "1,5000"]),
}


@pytest.fixture(scope="module")
def cached_engine_factory(engines, tiny_path):
    """HYV3Engine for the CLI, answered from the session's compiled tiny engine (custom kernels): valid vectors then
    generate for real without a compile per example. Any other engine setting is a test bug and fails loudly."""
    engine = engines.get(tiny_path, "custom")

    def factory(path, *, dtype, kernels, max_batch_size, max_length, page_size, **_):
        assert (Path(path), max_batch_size, max_length, page_size) == (Path(tiny_path), 4, 256, 16)
        assert kernels == "custom" and dtype in (None, engine.dtype)
        return engine
    return factory


@pytest.mark.slow
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(ARGS)), unique=True, max_size=6), st.data())
def test_random_argument_vectors(cached_engine_factory, tiny_path, capfd, chosen, data):
    flags = dict(zip(ENGINE_FLAGS[::2], ENGINE_FLAGS[1::2]))
    for flag in chosen:
        flags[flag] = data.draw(_value(*ARGS[flag]), label=flag)
    argv = ["--model-path", str(tiny_path), "--json"] + [x for kv in flags.items() for x in kv]
    capfd.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("hyv3_graph.runtime.HYV3Engine", cached_engine_factory)
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    out, err = capfd.readouterr()
    assert "Traceback" not in err
    if code == 0:
        lines = [json.loads(line) for line in out.strip().splitlines()]
        assert "stats" in lines[-1] and all(line["error"] is None for line in lines[:-1])
    else:
        assert code == 2, (argv, err)
        assert err.strip().splitlines()[-1].startswith("error:"), (argv, err)


def test_memory_check_before_loading(tiny_path, capsys, monkeypatch):
    """A KV cache larger than the memory available is refused before anything is allocated, naming what to change."""
    monkeypatch.setattr("hyv3_graph.runtime.mem_available", lambda: 1 << 30)
    code, err = run_main(["--model-path", str(tiny_path), "--max-batch-size", "512", "--max-length", "4096",
                          "--page-size", "16"], capsys)
    assert_one_error(code, err, "--skip-memory-check")
    assert "--max-length" in err.splitlines()[-1] and "KV cache" in err.splitlines()[-1]


# --- non-finite logits at run time ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_token_checkpoint(tiny_path, tmp_path_factory):
    """tiny with token 7's embedding row NaN: any sequence that reads token 7 gets NaN logits; the others do not."""
    ckpt = copy_checkpoint(tiny_path, tmp_path_factory.mktemp("nan") / "ckpt")
    n, header = _header(ckpt / "model.safetensors")
    entry = header["model.embed_tokens.weight"]
    H = entry["shape"][1]
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(8 + n + entry["data_offsets"][0] + 4 * H * 7)
        f.write(np.full(H, np.nan, np.float32).tobytes())
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["builtin", "custom"])
def test_nan_logits_stop_only_that_sequence(engines, tiny_path, nan_token_checkpoint, kernels):
    engine = engines.get(nan_token_checkpoint, kernels)
    good = [5, 17, 300, 2]
    outputs, stats = cli.generate(engine, [[9, 7, 8], good], max_new_tokens=6, ignore_eos=True)
    assert outputs[0] == [] and len(stats["errors"]) == 1
    e = stats["errors"][0]
    assert (e["sequence"], e["step"]) == (0, 0) and "NaN/inf" in e["error"] and "sequence 0" in e["error"]
    alone, _ = cli.generate(engines.get(tiny_path, kernels), [good], max_new_tokens=6, ignore_eos=True)
    assert outputs[1] == alone[0]


@pytest.mark.slow
def test_nan_logits_cli_exit_2_other_prompt_printed(engines, nan_token_checkpoint):
    engines.get(nan_token_checkpoint, "custom")  # compiled graph in MAX's cache: the subprocess hits it
    r = subprocess.run([sys.executable, "-m", "hyv3_graph.generate", "--model-path", str(nan_token_checkpoint),
                        "--prompt-ids", "9,7,8", "--prompt-ids", "5,17,300", "--max-new-tokens", "4", "--ignore-eos",
                        "--json", *ENGINE_FLAGS], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=1200)
    lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: sequence 0: the logits of step 0")
    assert lines[0]["error"] and lines[0]["output_ids"] == []
    assert lines[1]["error"] is None and len(lines[1]["output_ids"]) == 4


# --- the engine API, for callers that do not go through the CLI ------------------------------------------

@pytest.mark.slow
def test_engine_api_misuse_is_a_request_error(engines, tiny_path):
    engine = engines.get(tiny_path, "custom")
    free = engine.cache.free_pages
    with pytest.raises(RequestError, match="not in the cache"):
        engine.step([(0, [1, 2])])
    with pytest.raises(RequestError, match="sequence ids are integers"):
        engine.add_sequence("a")
    engine.add_sequence(0)
    try:
        with pytest.raises(RequestError, match="already in the cache"):
            engine.add_sequence(0)
        with pytest.raises(RequestError, match="appears twice"):
            engine.step([(0, [1]), (0, [2])])
        with pytest.raises(RequestError, match="must be integers"):
            engine.step([(0, [1.5, 2.0])])
        with pytest.raises(RequestError, match="pairs"):
            engine.step([0])
        with pytest.raises(RequestError, match="outside the vocab"):
            engine.step([(0, [-1])])
        assert engine.cache.length(0) == 0
        engine.step([(0, [1, 2])])
    finally:
        engine.release(0)
    with pytest.raises(RequestError, match="not in the cache"):
        engine.step([(0, [3])])  # a step after release
    with pytest.raises(RequestError, match="not in the cache"):
        engine.release(0)
    assert engine.cache.free_pages == free
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=2, temperature=float("nan")),
                dict(max_new_tokens=2, top_p=0.0), dict(max_new_tokens=2, top_k=-2)):
        with pytest.raises(RequestError):
            cli.generate(engine, [[1, 2]], **bad)
    assert engine.cache.free_pages == free


# --- long runs: flat memory, identical output ---------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


LONG_STEPS = 2000
RSS_GROWTH_BOUND = 16 << 20  # after 100 warm-up steps; the run's own state (outputs, samples) is ~100 kB


@pytest.mark.slow
def test_2000_decode_steps_flat_rss_and_repeatable(tiny_path):
    """One sequence decoding 2,000 steps (its own engine: the cache holds 2,048 positions), twice."""
    from hyv3_graph.runtime import HYV3Engine

    engine = HYV3Engine(tiny_path, kernels="custom", max_batch_size=1, max_length=2048, page_size=128)
    runs = []
    for _ in range(2):
        rss = []
        out, _ = cli.generate(engine, [[5, 17, 300]], max_new_tokens=LONG_STEPS, ignore_eos=True,
                              on_token=lambda seq, tok: rss.append(_rss_bytes()))
        runs.append(out[0])
        growth = max(rss[100:]) - rss[100]
        assert growth <= RSS_GROWTH_BOUND, f"RSS grew {growth / 2**20:.1f} MiB over {LONG_STEPS} steps"
    assert len(runs[0]) == LONG_STEPS and runs[0] == runs[1]
