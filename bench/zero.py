"""ZeRO stages 0-3 at DP = 2: per-rank parameter bytes, optimizer-state bytes (and the optimizer's
own fp32 parameter partitions), and step time.

Parameter bytes are what each rank's model holds (under ZeRO-3 its partition of every
parameter); optimizer-copy bytes the separate parameter tensors DeepSpeed hands the optimizer
(ZeRO-1/2/3's flat fp32 partitions); optimizer-state bytes AdamW's exp_avg and exp_avg_sq.

    python bench/zero.py [--model mid] [--rounds 3] [--steps 30]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import arguments, measure, model_overrides, record, table, write_json


def main() -> int:
    ap = arguments(__doc__, "zero", steps=30, warmup=6)
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
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
                          "results": record(results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
