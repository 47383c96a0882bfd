"""MLRA against standard attention (MHA) at equal width: step time, peak memory and parameters,
for MLRA rank d_head / 2 and d_head (Q, K, V factorized), at TP = 1 and 2.

The "mid" model (d 256, 4 heads of 64, 4 layers, seq 128) by default. Memory on rank 0:
activations (what autograd saves in one micro-batch's forward), the peak of the model's own
memory (parameters, gradients, optimizer copies and state, and those activations), and the
growth of the process's peak resident size during the run (libraries and buffers included, so
only differences between rows say much); parameters are the model's total.

    python bench/mlra.py [--model mid] [--tp 1 2] [--rounds 3] [--steps 40]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import arguments, measure, model_overrides, record, table, write_json


def main() -> int:
    ap = arguments(__doc__, "mlra", steps=40, warmup=8)
    ap.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args()

    from mlra_mega.config import load_config

    base = model_overrides(args.model)
    d_head = load_config(overrides=[o for o in base if o.startswith("model.")]).model.head_dim
    variants = {"MHA": ["model.attention=mha"],
                f"MLRA r={d_head // 2}": ["model.attention=mlra", f"model.mlra.rank={d_head // 2}"],
                f"MLRA r={d_head}": ["model.attention=mlra", f"model.mlra.rank={d_head}"]}
    contestants = {f"{name} TP{tp}": (tp, [*base, *extra, f"parallel.tensor={tp}", f"train.steps={args.steps}",
                                           "metrics.tev_interval=1"])
                   for tp in args.tp for name, extra in variants.items()}
    results = measure(contestants, args.rounds, args.warmup, Path(tempfile.mkdtemp(prefix="bench-mlra-")), tag="mlra")
    rows = []
    for name, r in results.items():
        tp_ref = results[f"MHA TP{name.rsplit('TP', 1)[1]}"]["step_s"]["median"]
        rank0 = r["last"]["ranks"][0]
        state = rank0["param_bytes"] * 2 + rank0["optimizer_param_copy_bytes"] + rank0["optimizer_state_bytes"]
        rows.append([name, 1e3 * r["step_s"]["median"], r["step_s"]["range_pct"], r["step_s"]["median"] / tp_ref,
                     r["last"]["parameters"] / 1e6, rank0["activation_bytes"] / 2**20, (state + rank0["activation_bytes"]) / 2**20,
                     rank0["peak_rss_growth_bytes"] / 2**20])
    print(table(["attention", "step ms", "range %", "x MHA", "params M", "activations MiB", "peak model MiB",
                 "RSS growth MiB"], rows,
                title=f"MLRA vs MHA, model {args.model} (d_head {d_head}), {args.rounds} rounds x {args.steps} steps"))
    write_json(args.out, {"model": args.model, "d_head": d_head, "rounds": args.rounds, "steps": args.steps,
                          "warmup": args.warmup,
                          "results": record(results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
