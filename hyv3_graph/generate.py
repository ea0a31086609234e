"""`python -m hyv3_graph.generate`: run Hy3 on prompts as one ragged batch over the paged KV cache.

    --model-path DIR          config.json + safetensors + tokenizer (default: the embedded tiny checkpoint)
    --prompt TEXT / --prompt-ids 1,2,3 / --prompt-file PATH   repeatable; all prompts run together
                              (--prompt - reads one prompt from stdin; no prompt at all: a default one)
    --chat [--system TEXT] [--reasoning-effort no_think|low|high]   wrap prompts in the tokenizer's chat template
    --interactive             prompt after prompt on the compiled engine (Ctrl-D to leave)
    --max-new-tokens N --temperature T (0 = greedy) --top-k K --top-p P --seed S --ignore-eos
    --dtype auto|float32|bfloat16|q8_0 --kernels custom|builtin --max-batch-size N --max-length N --page-size N
    --check-weights           scan every weight for NaN/inf before loading
    --expert-stats [PATH.png] tokens per expert per sparse layer, prefill and decode apart (and a heatmap)
    --skip-memory-check       load even when weights + KV cache + activations exceed MemAvailable
    --json                    one line per prompt {prompt_ids, output_ids, text, error}, then one stats line

Every flag is checked before anything is loaded or compiled: a bad value is one `error:` line naming the flag
and its accepted range, exit code 2. So is a request the engine cannot serve and a damaged checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .config import ConfigError
from .dtypes import DTYPES
from .model import KERNEL_BACKENDS
from .runtime import RequestError
from .sampling import SamplingError, check_sampling, sample
from .weights import WeightError

DEFAULT_PROMPT = "def forward(self"
REASONING_EFFORTS = ("no_think", "low", "high")
SEED_MAX = 2**64 - 1
PAGE_SIZE_MAX = 1 << 16  # MAX accepts any positive page size (its slots per page default to it); beyond this is waste


def generate(engine, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False, on_token=None) -> tuple[list[list[int]], dict]:
    """Runs all prompts as one ragged batch; returns the new tokens of each and timing stats.

    A sequence whose logits hold NaN/inf at some step stops there (nothing is sampled from them) and is named in
    `stats["errors"]` ({sequence, step, error}); the other sequences of the batch go on unaffected. Decode time
    counts the host-side sampling too."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    try:
        check_sampling(temperature, top_k, top_p)
    except SamplingError as e:
        raise RequestError(str(e)) from None
    eos = set(engine.cfg.eos_token_ids) if not ignore_eos else set()
    rng = np.random.default_rng(seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    errors: dict[int, dict] = {}
    host_s = 0.0  # per step after the forward: the NaN/inf check, sampling and `on_token`
    counts = ExpertCounts(engine) if getattr(engine, "expert_stats", False) else None
    added = []
    try:
        for i in range(len(prompts)):
            engine.add_sequence(i)
            added.append(i)
        t_start = time.perf_counter()
        logits = engine.step(list(enumerate(prompts)))  # [B, V]
        prefill_s = time.perf_counter() - t_start
        if counts:
            counts.add("prefill", engine.last_expert_counts)
        active, step, ttft_s = list(range(len(prompts))), 0, None
        t_decode = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            finite = np.isfinite(logits).all(axis=1)  # [B]
            still = []
            for row, i in enumerate(active):
                if not finite[row]:
                    errors[i] = {"sequence": i, "step": step,
                                 "error": f"sequence {i}: the logits of step {step} (output token {len(outputs[i])}) "
                                          f"hold NaN/inf; stopped it there (the other sequences are not affected)"}
                    continue
                tok = sample(logits[row], rng, temperature, top_k, top_p)
                outputs[i].append(tok)
                if on_token:
                    on_token(i, tok)
                if tok not in eos and len(outputs[i]) < max_new_tokens:
                    still.append(i)
            host_s += time.perf_counter() - t0
            if ttft_s is None:
                ttft_s = time.perf_counter() - t_start
                t_decode = time.perf_counter()
            active = still
            if not active:
                break
            step += 1
            logits = engine.step([(i, [outputs[i][-1]]) for i in active])
            if counts:
                counts.add("decode", engine.last_expert_counts)
        decode_s = time.perf_counter() - t_decode
    finally:
        for i in added:
            engine.release(i)
    n_out = sum(map(len, outputs))
    decode_tokens = n_out - sum(1 for o in outputs if o)  # the first token of each comes from the prefill
    stats = {"prefill_s": prefill_s, "prefill_tok_s": sum(map(len, prompts)) / prefill_s, "ttft_s": ttft_s,
             "decode_s": decode_s, "decode_tok_s": decode_tokens / decode_s if decode_tokens else None,
             "decode_tokens": decode_tokens, "host_us_per_token": 1e6 * host_s / max(n_out, 1),
             "errors": [errors[i] for i in sorted(errors)]}
    if counts:
        stats["expert_counts"] = counts.as_dict()
    return outputs, stats


class ExpertCounts:
    """Tokens per expert per sparse layer, summed over the prefill step and over the decode steps apart."""

    def __init__(self, engine):
        self.layers = list(engine.sparse_layers)
        shape = (len(self.layers), engine.cfg.num_experts)
        self.sums = {"prefill": np.zeros(shape, np.int64), "decode": np.zeros(shape, np.int64)}

    def add(self, phase: str, step_counts: np.ndarray) -> None:
        self.sums[phase] += step_counts

    def as_dict(self) -> dict:
        return {"layers": self.layers, **{phase: c.tolist() for phase, c in self.sums.items()}}


def expert_table(counts: dict) -> list[str]:
    """A compact table: per sparse layer and phase, tokens routed, experts used, the busiest expert, then every
    expert's count in expert order."""
    lines = ["layer phase    routed  used  busiest (tokens)  per expert 0.."]
    for n, layer in enumerate(counts["layers"]):
        for phase in ("prefill", "decode"):
            c = np.asarray(counts[phase][n])
            if not c.sum():
                continue
            lines.append(f"{layer:5d} {phase:8s} {int(c.sum()):6d} {int((c > 0).sum()):3d}/{c.size:<3d} "
                         f"e{int(c.argmax()):<4d}({int(c.max()):5d})   " + " ".join(str(int(v)) for v in c))
    return lines


def expert_heatmap(counts: dict, path: Path) -> None:
    """Layers x experts, prefill and decode side by side, tokens per expert as colour."""
    try:
        import matplotlib
    except ImportError:
        raise RequestError(f"--expert-stats {path}: drawing needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.25 * len(counts["layers"])), squeeze=False)
    for ax, phase in zip(axes[0], ("prefill", "decode")):
        im = ax.imshow(np.asarray(counts[phase]), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(f"{phase}: tokens per expert")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(counts["layers"])), [str(i) for i in counts["layers"]], fontsize=6)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the command line ---------------------------------------------------------------------------

QUANT = "q8_0"  # --dtype q8_0: Q8_0 matmul weights (hyv3_graph/q8_0.py)


def _precision(engine) -> str:
    """What --json reports as "dtype": the model dtype, or "q8_0" for Q8_0 weights (float32 activations)."""
    return engine.quant or str(engine.dtype)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error:` line (what every error of this CLI looks like), exit 2."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _int_in(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is outside [{lo}, {hi if hi is not None else 'inf'})"
                                             if hi is None else f"{v} is outside [{lo}, {hi}]")
        return v
    return parse


def _float_where(accept, what: str):
    """A float flag's parser: `accept(v)` must hold (it is False for NaN, and for text that is not a number)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not accept(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_temperature = _float_where(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)")
_top_p = _float_where(lambda v: 0 < v <= 1, "a number in (0, 1]")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m hyv3_graph.generate", description=__doc__.split("\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model-path", type=Path, default=None, help="checkpoint dir (default: embedded tiny)")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable; '-' = read stdin)")
    ap.add_argument("--prompt-ids", action="append", default=[], type=_parse_ids, help="comma-separated token ids (repeatable)")
    ap.add_argument("--prompt-file", action="append", default=[], type=Path, help="a file whose text is one prompt (repeatable)")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    ap.add_argument("--system", default=None, help="system message for --chat")
    ap.add_argument("--reasoning-effort", choices=REASONING_EFFORTS, default=None, help="passed to the chat template")
    ap.add_argument("--interactive", action="store_true", help="read prompt after prompt from stdin (Ctrl-D ends)")
    ap.add_argument("--max-new-tokens", type=_int_in(1), default=32, help="new tokens per prompt, >= 1")
    ap.add_argument("--temperature", type=_temperature, default=0.0, help="finite, >= 0; 0 = greedy")
    ap.add_argument("--top-k", type=_int_in(0), default=0, help=">= 0; 0 = off")
    ap.add_argument("--top-p", type=_top_p, default=1.0, help="in (0, 1]")
    ap.add_argument("--seed", type=_int_in(0, SEED_MAX), default=0, help=f"in [0, {SEED_MAX}]")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--dtype", choices=["auto", *sorted(DTYPES), QUANT], default="auto",
                    help="model dtype; auto = the checkpoint's own (config dtype, else its tensors'); q8_0 = the "
                         "matmul weights quantized to llama.cpp's Q8_0 at load, float32 activations and KV cache "
                         "(--kernels custom)")
    ap.add_argument("--kernels", choices=KERNEL_BACKENDS, default="custom",
                    help="custom = our Mojo kernels (default); builtin = MAX's own ops, the reference")
    ap.add_argument("--max-batch-size", type=_int_in(1, 4096), default=8, help="sequences in the KV cache, 1..4096")
    ap.add_argument("--max-length", type=_int_in(1), default=1024,
                    help="KV cache capacity per sequence in tokens, 1..max_position_embeddings")
    ap.add_argument("--page-size", type=_int_in(1, PAGE_SIZE_MAX), default=128,
                    help=f"KV cache page size in tokens, 1..{PAGE_SIZE_MAX}")
    ap.add_argument("--check-weights", action="store_true", help="scan every weight for NaN/inf before loading")
    ap.add_argument("--expert-stats", nargs="?", const=True, default=None, metavar="PATH.png",
                    help="after generating: tokens per expert per sparse layer (stderr and --json stats); "
                         "with a .png path also a heatmap (needs --kernels custom)")
    ap.add_argument("--skip-memory-check", action="store_true",
                    help="load even when the estimate exceeds the memory available")
    ap.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        return _run(args, log)
    except (ConfigError, WeightError, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _check_args(args, cfg) -> None:
    """What needs the config (the flags' own ranges were checked while parsing)."""
    if args.max_length > cfg.max_position_embeddings:
        raise RequestError(f"--max-length {args.max_length} exceeds the model's max_position_embeddings "
                           f"{cfg.max_position_embeddings}")
    if (args.system is not None or args.reasoning_effort is not None) and not args.chat:
        raise RequestError("--system and --reasoning-effort go with --chat")
    if args.interactive and args.json:
        raise RequestError("--interactive prints text as it streams; it does not go with --json")
    if args.dtype == QUANT and args.kernels != "custom":
        raise RequestError("--dtype q8_0 runs on our ops only: it needs --kernels custom")
    if args.expert_stats is not None:
        if args.kernels != "custom":
            raise RequestError("--expert-stats comes from our router op: it needs --kernels custom")
        if args.expert_stats is not True and not str(args.expert_stats).endswith(".png"):
            raise RequestError(f"--expert-stats: expected a .png path for the heatmap, got {args.expert_stats!r}")


class Prompter:
    """Text -> prompt token ids: plain (the tokenizer's own special-token policy: `add_special_tokens=True`, so
    a BOS where its post-processor adds one) or through its chat template (which writes its own special
    tokens, so encoded with `add_special_tokens=False`)."""

    def __init__(self, tokenizer, chat: bool, system: str | None, reasoning_effort: str | None):
        self.tokenizer, self.chat, self.system, self.reasoning_effort = tokenizer, chat, system, reasoning_effort
        if chat and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise RequestError("--chat: this tokenizer has no chat template")

    def messages(self, history: list[dict], text: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + history + [{"role": "user", "content": text}]

    def encode(self, text: str, history: list[dict] | None = None) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer: use --prompt-ids")
        if not self.chat:
            return self.tokenizer.encode(text, add_special_tokens=True)
        extra = {"reasoning_effort": self.reasoning_effort} if self.reasoning_effort else {}
        rendered = self.tokenizer.apply_chat_template(self.messages(history or [], text), tokenize=False,
                                                      add_generation_prompt=True, **extra)
        return self.tokenizer.encode(rendered, add_special_tokens=False)


def _prompt_texts(args) -> list[str]:
    texts = []
    for p in args.prompt:
        texts.append(sys.stdin.read() if p == "-" else p)
    for f in args.prompt_file:
        try:
            texts.append(f.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise RequestError(f"--prompt-file {f}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    return texts


def _check_prompts(prompts: list[list[int]], args, cfg) -> None:
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


def _run(args, log) -> int:
    from .checkpoints import embedded_checkpoint
    from .config import HYV3Config

    model_path = args.model_path
    if model_path is None:
        log("no --model-path: using the embedded tiny checkpoint (random weights: the text is meaningless)")
        model_path = embedded_checkpoint("tiny")
    cfg = HYV3Config.from_file(model_path)
    _check_args(args, cfg)
    log(cfg.summary())

    tokenizer = _tokenizer(model_path)
    prompter = Prompter(tokenizer, args.chat, args.system, args.reasoning_effort)
    prompts = [list(p) for p in args.prompt_ids]
    texts = _prompt_texts(args)
    if not prompts and not texts and not args.interactive:
        if tokenizer is None:
            raise RequestError(f"no prompt, and {model_path} has no tokenizer for the default one: give --prompt-ids")
        log(f"no prompt given: using {DEFAULT_PROMPT!r}")
        texts = [DEFAULT_PROMPT]
    prompts += [prompter.encode(t) for t in texts]
    _check_prompts(prompts, args, cfg)

    from .runtime import HYV3Engine

    quant = QUANT if args.dtype == QUANT else None
    engine = HYV3Engine(model_path, dtype=DTYPES.get(args.dtype), kernels=args.kernels, quant=quant,
                        max_batch_size=args.max_batch_size, max_length=args.max_length, page_size=args.page_size,
                        progress=log, check_memory_first=not args.skip_memory_check,
                        check_finite_weights=args.check_weights, expert_stats=args.expert_stats is not None)
    log(f"{_precision(engine)} model, --kernels {args.kernels}: compiled in {engine.compile_s:.1f}s")
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    if args.interactive:
        return _interactive(engine, tokenizer, prompter, prompts, args, sampling, log)
    return _batch(engine, tokenizer, prompts, args, sampling, log, echo_prompt=not args.chat)


def _batch(engine, tokenizer, prompts, args, sampling, log, echo_prompt: bool) -> int:
    stream = not args.json and len(prompts) == 1 and tokenizer is not None
    if stream and echo_prompt:
        print(tokenizer.decode(prompts[0]), end="", flush=True)
    on_token = TextStream(tokenizer) if stream else None
    outputs, stats = generate(engine, prompts, on_token=on_token, **sampling)
    stats = {"compile_s": engine.compile_s, "load_s": engine.load_s, "dtype": _precision(engine),
             "kernels": args.kernels, **stats}
    failed = {e["sequence"]: e["error"] for e in stats["errors"]}
    if args.json:
        for n, (p, out) in enumerate(zip(prompts, outputs)):
            text = tokenizer.decode(out) if tokenizer is not None else None
            print(json.dumps({"prompt_ids": p, "output_ids": out, "text": text, "error": failed.get(n)}))
        print(json.dumps({"stats": stats}))
    else:
        if stream:
            on_token.flush()
            print()
        else:
            for n, (p, out) in enumerate(zip(prompts, outputs)):
                shown = tokenizer.decode(out) if tokenizer is not None else out
                print(f"[{n}] {shown!r}")
        log(_stats_line(stats))
    if "expert_counts" in stats:
        log("\n".join(expert_table(stats["expert_counts"])))
        if args.expert_stats is not True:
            expert_heatmap(stats["expert_counts"], Path(args.expert_stats))
            log(f"expert heatmap: {args.expert_stats}")
    for e in stats["errors"]:
        print(f"error: {e['error']}", file=sys.stderr)
    return 2 if failed else 0


def _interactive(engine, tokenizer, prompter, first, args, sampling, log) -> int:
    """One prompt per line on stdin, each streamed as it is generated; with --chat the conversation is kept."""
    history: list[dict] = []
    pending = list(first)
    log("interactive: one prompt per line, Ctrl-D to leave" + (" (the conversation is kept)" if args.chat else ""))
    while True:
        if pending:
            ids, text = pending.pop(0), None
        else:
            try:
                print("> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return 0
            if not line:  # Ctrl-D / end of input
                print(file=sys.stderr)
                return 0
            text = line.rstrip("\n")
            if not text.strip():
                continue
            try:
                ids = prompter.encode(text, history)
            except RequestError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
        if len(ids) + args.max_new_tokens > args.max_length:
            print(f"error: this prompt needs {len(ids) + args.max_new_tokens} cache positions, --max-length is "
                  f"{args.max_length}" + (" (the conversation is too long: start again)" if history else ""),
                  file=sys.stderr)
            continue
        stream = TextStream(tokenizer) if tokenizer is not None else None
        try:
            outputs, stats = generate(engine, [ids], on_token=stream, **sampling)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
            continue
        except RequestError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if stream:
            stream.flush()
            print()
        else:
            print(outputs[0])
        for e in stats["errors"]:
            print(f"error: {e['error']}", file=sys.stderr)
        log(_stats_line(stats))
        if args.chat and text is not None:
            history += [{"role": "user", "content": text},
                        {"role": "assistant", "content": tokenizer.decode(outputs[0], skip_special_tokens=True)}]


def _stats_line(stats: dict) -> str:
    decode = f"{stats['decode_tok_s']:.1f} tok/s" if stats["decode_tok_s"] else "n/a"
    return (f"time to first token {1e3 * stats['ttft_s']:.0f} ms | prefill {stats['prefill_tok_s']:.1f} tok/s | "
            f"decode {decode} (host {stats['host_us_per_token']:.0f} us/token)")


class TextStream:
    """Prints generated text as it grows, decoding only a short window of tokens per call (O(1) per token, not the
    whole output): the tokens since the last point where the text was complete. Holds back while the window ends
    in a partial UTF-8 character (byte-level BPE splits characters across tokens)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.tokens: list[int] = []
        self.prefix = 0  # window start: a token boundary where the text decoded so far was complete
        self.read = 0  # tokens whose text has been printed

    def __call__(self, seq: int, token: int) -> None:
        self.tokens.append(token)
        done = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            print(text[len(done):], end="", file=self.out, flush=True)
            self.prefix, self.read = self.read, len(self.tokens)

    def flush(self) -> None:
        """Prints whatever is held back (a partial character at the very end)."""
        done = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        if len(text) > len(done):
            print(text[len(done):], end="", file=self.out, flush=True)
        self.prefix = self.read = len(self.tokens)


def _tokenizer(model_path: Path):
    if not any((model_path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise RequestError(f"{model_path}: the tokenizer does not load ({e})") from None


if __name__ == "__main__":
    sys.exit(main())
