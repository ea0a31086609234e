"""python -m bench [--only NAME ...] [--quick] [--json PATH]

Runs every case of every bench (see bench/cases/), prints a table, writes bench/results/latest.md and
latest.png (latest-quick.*, latest-<only>.* for partial runs), and with --json the machine-readable results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

from .cases import MODULES
from .harness import Disagreement, measure_machine

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parents[1] / "README.md"
README_BEGIN, README_END = "<!-- bench table: begin (written by python -m bench) -->", "<!-- bench table: end -->"


def _fmt_s(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def table(rows: list[dict]) -> list[str]:
    head = ["bench", "case", "impl", "median", "min", "GFLOP/s", "GB/s", "roofline", "local roofline", "mojo speedup",
            "version"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["bench"], r["case"], r["impl"], _fmt_s(r["median_s"]), _fmt_s(r["min_s"]),
                 f"{r['gflops']:.1f}" if r.get("gflops") else "", f"{r['gbs']:.2f}" if r.get("gbs") else "",
                 f"{100 * r['roofline_frac']:.1f}%" if r.get("roofline_frac") else "",
                 f"{100 * r['local_roofline_frac']:.1f}% of {r['local_roofline']:.1f}" if r.get("local_roofline_frac") else "",
                 f"{r['speedup_of_mojo']:.2f}x" if r.get("speedup_of_mojo") else (
                     f"{r['ratio_to_L4']:.2f}x of L4" if r.get("ratio_to_L4") else ""),
                 r.get("version", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """One horizontal bar per peer row: peer time / our time within its case (ours is 1 by definition, not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    peers = [r for r in rows if r.get("speedup_of_mojo") and r["impl"] != "mojo"]
    if not peers:
        return
    colors = {"max": "tab:orange", "torch": "tab:blue", "numpy": "tab:purple", "llama.cpp": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 1 + 0.22 * len(peers)))
    y = range(len(peers))
    ratios = [r["speedup_of_mojo"] for r in peers]
    ax.barh(y, ratios, color=[colors.get(r["impl"], "tab:gray") for r in peers])
    for i, ratio in zip(y, ratios):
        ax.text(ratio, i, f" {ratio:.2f}x", va="center", fontsize=6)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(y), [f"{r['bench']} {r['case']}: {r['impl']}" for r in peers], fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("peer time / our time, medians (right of 1 = ours faster)")
    shown = sorted({r["impl"] for r in peers})
    ax.legend(handles=[matplotlib.patches.Patch(color=colors.get(i, "tab:gray"), label=i) for i in shown],
              loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_readme_table(md: str, readme: Path = README) -> None:
    """A full run's table goes into the README between the markers, so the README's figures are the bench's."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return
    head, rest = text.split(README_BEGIN, 1)
    readme.write_text(head + README_BEGIN + "\n" + md + "\n" + README_END + rest.split(README_END, 1)[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", default=[], help="bench name (repeatable): " +
                    ", ".join(m.BENCH for m in MODULES))
    ap.add_argument("--quick", action="store_true", help="small shapes, for the CI smoke test")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    unknown = set(args.only) - {m.BENCH for m in MODULES}
    if unknown:
        ap.error(f"unknown bench {sorted(unknown)}")

    machine = measure_machine(args.quick)
    machine |= {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick}
    print(f"machine: {machine['peak_gflops']:.0f} GFLOP/s peak fp32 GEMM, {machine['bandwidth_gbs']:.1f} GB/s read, "
          f"{machine['cores']} cores, MAX graph execute: empty {machine['max_execute_overhead_us']:.1f} us, "
          f"one op {machine['max_one_op_execute_us']:.1f} us", flush=True)
    rows: list[dict] = []
    failed = []
    for module in MODULES:
        if args.only and module.BENCH not in args.only:
            continue
        print(f"running {module.BENCH} ...", flush=True)
        try:
            new = module.results(args.quick, machine)
        except Disagreement as e:
            print(f"FAILED {module.BENCH}: implementations disagree: {e}", file=sys.stderr)
            failed.append(module.BENCH)
            continue
        rows += new
        print("\n".join(table(new)), flush=True)

    RESULTS.mkdir(exist_ok=True)
    stem = "latest" + ("-quick" if args.quick else "") + "".join(f"-{name}" for name in sorted(args.only))
    md = [f"Machine: {machine['cores']} cores, peak fp32 GEMM {machine['peak_gflops']:.0f} GFLOP/s "
          f"({machine['gemm']}), read bandwidth {machine['bandwidth_gbs']:.1f} GB/s ({machine['bandwidth_method']}), "
          f"MAX graph execute: empty {machine['max_execute_overhead_us']:.1f} us, one op "
          f"{machine['max_one_op_execute_us']:.1f} us; \"local roofline\": the same probe run around each row's own timings "
          "(GFLOP/s for compute-bound cases, GB/s for memory-bound ones); "
          f"{machine['date']}{' (--quick)' if args.quick else ''}", "", *table(rows)]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    if stem == "latest":
        write_readme_table("\n".join(md))
    plot(rows, RESULTS / f"{stem}.png")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": rows, "failed": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
