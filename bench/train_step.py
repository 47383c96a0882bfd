"""Step times of the quickstart-sized model at several TP x DP layouts and ZeRO stages (CPU or GPU).

Prints a table and writes JSON: for each layout, `mlra-mega train` on configs/quickstart.yaml
(sample corpus data, made once) under torchrun, and the median step time, tokens/s and achieved
TFLOP/s per device over the steps after warm-up, read from the run's metrics.jsonl.

    python bench/train_step.py [--steps 40] [--out bench/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = [  # (name, processes, overrides)
    ("TP1 DP1 ZeRO-1", 1, ["parallel.tensor=1", "zero.stage=1"]),
    ("TP2 DP1 ZeRO-1", 2, ["parallel.tensor=2", "zero.stage=1"]),
    ("TP2 DP2 ZeRO-1", 4, ["parallel.tensor=2", "zero.stage=1"]),
    ("TP2 DP2 ZeRO-3", 4, ["parallel.tensor=2", "zero.stage=3"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the statistics")
    ap.add_argument("--out", default="bench/results/train_step.json")
    args = ap.parse_args()

    from mlra_mega.quickstart import prepare_sample_data

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    tok, prefix = prepare_sample_data(work / "data", log=lambda s: None)
    rows = []
    for name, nproc, overrides in LAYOUTS:
        run_dir = work / name.replace(" ", "_")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "mlra_mega", "train", str(REPO / "configs" / "quickstart.yaml"), *overrides,
               f"data.tokenizer={tok}", f"data.paths=[{prefix}]", f"train.steps={args.steps}",
               f"run.dir={run_dir}", "eval.interval=0", "metrics.tev_interval=1", "train.log_interval=1000000"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if r["step"] > args.warmup and "step_time_s" in r]
        rows.append({"layout": name, "processes": nproc,
                     "step_time_ms": 1000 * statistics.median(r["step_time_s"] for r in timed),
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                     "tflops_per_device": statistics.median(r["tflops_per_device"] for r in timed)})
    print(f"quickstart model ({args.steps} steps, median after {args.warmup}); "
          f"host: {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    print(f"{'layout':<16} {'procs':>5} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s/dev':>12}")
    for r in rows:
        print(f"{r['layout']:<16} {r['processes']:>5} {r['step_time_ms']:>9.1f} {r['tokens_per_s']:>10,.0f} "
              f"{r['tflops_per_device']:>12.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "warmup": args.warmup, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
