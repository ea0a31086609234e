"""`python -m hyv3_graph.generate`: run Hy3 on prompts as one ragged batch over the paged KV cache.

    --model-path DIR          config.json + safetensors + tokenizer (default: the embedded tiny checkpoint)
    --prompt TEXT / --prompt-ids 1,2,3   repeatable; all prompts run together
    --max-new-tokens N --temperature T (0 = greedy) --top-k K --top-p P --seed S --ignore-eos
    --dtype float32|bfloat16 --kernels builtin|custom --max-batch-size N --max-length N (KV capacity) --page-size N
    --json                    one line per prompt {prompt_ids, output_ids, text}, then one stats line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .config import ConfigError
from .dtypes import DTYPES
from .model import KERNEL_BACKENDS
from .runtime import RequestError
from .weights import WeightError


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> int:
    """One token from float32 logits [V]: argmax at temperature 0, else top-k / top-p filtered sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p  # smallest prefix whose mass reaches top_p
        p[order[~keep]] = 0.0
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def generate(engine, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False, on_token=None) -> tuple[list[list[int]], dict]:
    """Runs all prompts as one ragged batch; returns the new tokens of each and timing stats."""
    eos = set(engine.cfg.eos_token_ids) if not ignore_eos else set()
    rng = np.random.default_rng(seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    for i in range(len(prompts)):
        engine.add_sequence(i)
    try:
        t0 = time.perf_counter()
        logits = engine.step(list(enumerate(prompts)))
        prefill_s = time.perf_counter() - t0
        active = list(range(len(prompts)))
        decode_s, decode_tokens = 0.0, 0
        while True:
            still = []
            for row, i in enumerate(active):
                tok = sample(logits[row], rng, temperature, top_k, top_p)
                outputs[i].append(tok)
                if on_token:
                    on_token(i, tok)
                if tok not in eos and len(outputs[i]) < max_new_tokens:
                    still.append(i)
            active = still
            if not active:
                break
            t0 = time.perf_counter()
            logits = engine.step([(i, [outputs[i][-1]]) for i in active])
            decode_s += time.perf_counter() - t0
            decode_tokens += len(active)
    finally:
        for i in range(len(prompts)):
            engine.release(i)
    stats = {"prefill_s": prefill_s, "prefill_tok_s": sum(map(len, prompts)) / prefill_s,
             "decode_s": decode_s, "decode_tok_s": decode_tokens / decode_s if decode_s else None,
             "decode_tokens": decode_tokens}
    return outputs, stats


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids wants comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyv3_graph.generate", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, default=None, help="checkpoint dir (default: embedded tiny)")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    ap.add_argument("--prompt-ids", action="append", default=[], type=_parse_ids, help="comma-separated token ids (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--kernels", choices=KERNEL_BACKENDS, default="builtin")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024, help="KV cache capacity per sequence, in tokens")
    ap.add_argument("--page-size", type=int, default=128, help="KV cache page size, in tokens")
    ap.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    args = ap.parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))

    try:
        return _run(args, log)
    except (ConfigError, WeightError, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, log) -> int:
    from .checkpoints import embedded_checkpoint
    from .config import HYV3Config

    model_path = args.model_path
    if model_path is None:
        log("no --model-path: using the embedded tiny checkpoint (random weights: the text is meaningless)")
        model_path = embedded_checkpoint("tiny")
    cfg = HYV3Config.from_file(model_path)
    log(cfg.summary())

    tokenizer = _tokenizer(model_path)
    prompts = [list(p) for p in args.prompt_ids]
    for text in args.prompt:
        if tokenizer is None:
            raise RequestError(f"{model_path} has no tokenizer: use --prompt-ids")
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    if not prompts:
        raise RequestError("no prompt: give --prompt TEXT or --prompt-ids 1,2,3")
    for n, p in enumerate(prompts):
        if not p:
            raise RequestError(f"prompt {n} is empty")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise RequestError(f"prompt {n}: token id {bad[0]} outside the vocab [0, {cfg.vocab_size})")
    if len(prompts) > args.max_batch_size:
        raise RequestError(f"{len(prompts)} prompts exceed the batch capacity {args.max_batch_size} (--max-batch-size)")
    for n, p in enumerate(prompts):
        if len(p) + args.max_new_tokens > args.max_length:
            raise RequestError(f"prompt {n} has {len(p)} tokens; with --max-new-tokens {args.max_new_tokens} it needs "
                               f"{len(p) + args.max_new_tokens} cache positions, --max-length is {args.max_length}")

    from .runtime import HYV3Engine

    engine = HYV3Engine(model_path, dtype=DTYPES[args.dtype], kernels=args.kernels, max_batch_size=args.max_batch_size,
                        max_length=args.max_length, page_size=args.page_size, progress=log)
    log(f"compiled in {engine.compile_s:.1f}s")

    stream = not args.json and len(prompts) == 1 and tokenizer is not None
    if stream:
        print(tokenizer.decode(prompts[0]), end="", flush=True)
    on_token = _TextStream(tokenizer) if stream else None
    outputs, stats = generate(engine, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
                              on_token=on_token)
    stats = {"compile_s": engine.compile_s, "load_s": engine.load_s, **stats}
    if args.json:
        for p, out in zip(prompts, outputs):
            text = tokenizer.decode(out) if tokenizer is not None else None
            print(json.dumps({"prompt_ids": p, "output_ids": out, "text": text}))
        print(json.dumps({"stats": stats}))
    else:
        if stream:
            print()
        else:
            for n, (p, out) in enumerate(zip(prompts, outputs)):
                shown = tokenizer.decode(out) if tokenizer is not None else out
                print(f"[{n}] {shown!r}")
        decode = f"{stats['decode_tok_s']:.1f} tok/s" if stats["decode_tok_s"] else "n/a"
        log(f"compile {stats['compile_s']:.1f}s | prefill {stats['prefill_tok_s']:.1f} tok/s | decode {decode}")
    return 0


class _TextStream:
    """Prints generated text as it grows: decodes the whole output and prints what is new, holding back
    while the text ends in a partial UTF-8 character (byte-level BPE splits characters across tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], 0

    def __call__(self, seq: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):
            print(text[self.printed:], end="", flush=True)
            self.printed = len(text)


def _tokenizer(model_path: Path):
    if not any((model_path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


if __name__ == "__main__":
    sys.exit(main())
