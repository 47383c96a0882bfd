"""Step time against depth: 4 to 32 layers, a least-squares fit t(L) = a + b L, b the marginal cost
of a layer, a the cost of everything else, and each depth's residual (goal: all within 5% of the
fit, so cost is linear in depth).

The "mid" model's width (d 256, 4 heads, seq 128, MLRA as in the quickstart) by default.

    python bench/depth.py [--model mid] [--layers 4 8 12 16 24 32] [--rounds 3] [--steps 30]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import arguments, measure, record, model_overrides, table, write_json

GOAL_PCT = 5.0


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares line y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> int:
    ap = arguments(__doc__, "depth", steps=30, warmup=6)
    ap.add_argument("--layers", nargs="+", type=int, default=[4, 8, 12, 16, 24, 32])
    args = ap.parse_args()

    base = [o for o in model_overrides(args.model) if not o.startswith("model.num_layers=")]
    contestants = {f"L{n}": (1, [*base, f"model.num_layers={n}", f"train.steps={args.steps}"]) for n in args.layers}
    results = measure(contestants, args.rounds, args.warmup, Path(tempfile.mkdtemp(prefix="bench-depth-")),
                      tag="depth")
    times = [results[f"L{n}"]["step_s"]["median"] for n in args.layers]
    a, b = linear_fit([float(n) for n in args.layers], times)
    residuals = [100 * (t - (a + b * n)) / (a + b * n) for n, t in zip(args.layers, times)]
    rows = [[f"{n}", 1e3 * t, results[f"L{n}"]["step_s"]["range_pct"], 1e3 * (a + b * n), r]
            for n, t, r in zip(args.layers, times, residuals)]
    print(table(["layers", "step ms", "range %", "fit ms", "residual %"], rows,
                title=f"step time against depth, model {args.model}, {args.rounds} rounds x {args.steps} steps"))
    worst = max(residuals, key=abs)
    print(f"fit: t(L) = {1e3 * a:.2f} ms + {1e3 * b:.3f} ms x L; largest residual {worst:+.2f}% "
          f"(goal within {GOAL_PCT:g}%)")
    write_json(args.out, {"model": args.model, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                          "layers": args.layers, "step_s": times, "a_s": a, "b_s_per_layer": b,
                          "residual_pct": residuals, "largest_residual_pct": worst, "goal_pct": GOAL_PCT,
                          "per_depth": record(results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
