"""ZeRO stages 0-3 at DP = 2: per-rank parameter bytes, optimizer-state bytes (and the optimizer's
own fp32 parameter partitions), and step time.

Parameter bytes are what each rank's model holds (under ZeRO-3 its partition of every
parameter); optimizer-copy bytes the separate parameter tensors DeepSpeed hands the optimizer
(ZeRO-1/2/3's flat fp32 partitions); optimizer-state bytes AdamW's exp_avg and exp_avg_sq.

    python bench/zero.py [--model mid] [--rounds 3] [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MODELS, RESULTS, measure, model_overrides, table, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mid", choices=list(MODELS))
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--out", default=str(RESULTS / "zero.json"))
    args = ap.parse_args()

    base = model_overrides(args.model)
    contestants = {f"ZeRO-{z}": (2, [*base, f"zero.stage={z}", "parallel.tensor=1", f"train.steps={args.steps}"])
                   for z in args.stages}
    results = measure(contestants, args.rounds, args.warmup, Path(tempfile.mkdtemp(prefix="bench-zero-")), tag="zero")
    mib = 2**20
    rows = []
    for name, r in results.items():
        ranks = r["last"]["ranks"]
        rows.append([name, 1e3 * r["step_s"]["median"], r["step_s"]["range_pct"],
                     *(x / mib for x in (ranks[0]["param_bytes"], ranks[0]["optimizer_param_copy_bytes"],
                                         ranks[0]["optimizer_state_bytes"], ranks[1]["optimizer_state_bytes"]))])
    print(table(["stage", "step ms", "range %", "param MiB/rank", "opt copy MiB/rank", "opt state MiB r0",
                 "opt state MiB r1"], rows,
                title=f"ZeRO at DP=2, model {args.model} ({results[next(iter(results))]['last']['parameters'] / 1e6:.2f}M "
                      f"parameters), {args.rounds} rounds x {args.steps} steps"))
    write_json(args.out, {"model": args.model, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                          "results": {k: {"step_s": v["step_s"], "per_round_s": v["per_round_s"],
                                          "parameters": v["last"]["parameters"], "ranks": v["last"]["ranks"]}
                                      for k, v in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
