"""Step times of the quickstart model at several TP x DP layouts and ZeRO stages (CPU or GPU).

Each layout runs our trainer (bench/trainer_worker.py, tracking off, TEV every step) under
torchrun, once per round, rounds interleaved; the result is the median over rounds of each
round's median step-to-step time after warm-up, with tokens/s from it.

    python bench/train_step.py [--rounds 3] [--steps 40] [--out bench/results/train_step.json]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import arguments, measure, record, model_overrides, table, write_json

LAYOUTS = [  # (name, processes, overrides)
    ("TP1 DP1 ZeRO-1", 1, ["parallel.tensor=1", "zero.stage=1"]),
    ("TP2 DP1 ZeRO-1", 2, ["parallel.tensor=2", "zero.stage=1"]),
    ("TP1 DP2 ZeRO-1", 2, ["parallel.tensor=1", "zero.stage=1"]),
    ("TP2 DP2 ZeRO-1", 4, ["parallel.tensor=2", "zero.stage=1"]),
    ("TP2 DP2 ZeRO-3", 4, ["parallel.tensor=2", "zero.stage=3"]),
]


def main() -> int:
    args = arguments(__doc__, "train_step", steps=40, warmup=8, model=None).parse_args()

    base = model_overrides("quickstart")
    contestants = {name: (nproc, [*base, *extra, f"train.steps={args.steps}"]) for name, nproc, extra in LAYOUTS}
    results = measure(contestants, args.rounds, args.warmup, Path(tempfile.mkdtemp(prefix="bench-layout-")),
                      tag="layout")
    tokens = results[LAYOUTS[0][0]]["last"]["tokens_per_step"]
    rows = [[name, nproc, 1e3 * results[name]["step_s"]["median"], results[name]["step_s"]["range_pct"],
             tokens / results[name]["step_s"]["median"]] for name, nproc, _ in LAYOUTS]
    print(table(["layout", "procs", "step ms", "range %", "tokens/s"], rows,
                title=f"quickstart model, {args.rounds} rounds x {args.steps} steps (median after {args.warmup})"))
    write_json(args.out, {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                          "layouts": record(results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
