"""The depth study's tables (A)-(E) from its sweep's run directories (mlra_mega/study.py).

    python scripts/paper_study_report.py [runs/paper-depth-cpu-v2/cpu-study] [--out FILE.md] [--plots DIR]

Prints the Markdown (or writes it to --out), with the learning-rate bracket it was run at; with
--plots, the loss, TEV, gradient-norm and residual-variance plots (a panel per depth and rate)
go to DIR. Runs that have not reached their last step are left out and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from mlra_mega.study import load_runs, study_plots, study_tables

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", default=str(REPO / "runs" / "paper-depth-cpu-v2" / "cpu-study"))
    parser.add_argument("--bracket", default=str(REPO / "docs" / "results" / "paper-depth-cpu" / "lr-bracket.json"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--plots", default=None, help="directory for the PNGs")
    args = parser.parse_args(argv)
    sweep = Path(args.sweep_dir)
    if not sweep.is_dir():
        print(f"error: {sweep} is not a sweep directory (run the sweep first)", file=sys.stderr)
        return 2
    runs = load_runs(sweep)
    started = sum(1 for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    lines = [f"{len(runs)} finished runs of {sweep} ({started - len(runs)} unfinished left out)."]
    if Path(args.bracket).is_file():
        b = json.loads(Path(args.bracket).read_text())
        lines.append(f"Rates from the bracket ({b['steps']}-step probes at depth {b['depth']}): "
                     f"lr* = {b['lr_star']:g}, lr_mlra = {b['lr_mlra']:g}.")
    text = "\n".join([*lines, "", *study_tables(runs), ""]) if runs else "\n".join(lines) + "\n"
    if args.plots and runs:
        for name, (rows, cols) in study_plots(runs, Path(args.plots)).items():
            print(f"[study] {Path(args.plots) / name}: {rows} depth(s) x {cols} rate(s)", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
