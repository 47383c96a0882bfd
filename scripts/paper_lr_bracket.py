"""The depth study's learning-rate bracket (configs/paper/README.md): at the deepest CPU depth,
vanilla and MLRA each probed from 1e-3 in factors of 2 until two rates past the best.

    python scripts/paper_lr_bracket.py [--out runs/paper-depth-cpu/lr-bracket] [--steps 150]

A probe is a run of configs/paper/cpu.yaml at depth 16: `--steps` steps, warm-up 10%, cosine to
10% of the rate, validation loss on the whole held-out split at the end. A probe "diverges" when a
loss is not finite, a step was skipped, or the validation loss is not finite; it counts as worse
than any rate that did not. The search (`next_rate`) starts with 1e-3 and 5e-4: upward in factors
of 2 when 1e-3 is the better, downward otherwise, and stops once two rates beyond the best in that
direction have been probed (at most 10 rates). lr* is vanilla's best rate, lr_mlra MLRA's. Each
finished probe is kept: a rerun skips it. Writes `bracket.json` (every probe, both choices) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "configs" / "paper" / "cpu.yaml"
START, MAX_PROBES = 1e-3, 10


def next_rate(results: dict[float, float], start: float = START) -> float | None:
    """The next rate to probe given {rate: validation loss (inf: diverged)}, or None when done."""
    if start not in results:
        return start
    if start / 2 not in results:
        return start / 2
    if len(results) >= MAX_PROBES:
        return None
    best = min(results, key=lambda r: (results[r], r))
    up = results[start] <= results[start / 2]
    beyond = [r for r in results if (r > best if up else r < best)]
    if len(beyond) >= 2:
        return None
    edge = max(results) if up else min(results)
    return edge * 2 if up else edge / 2


def probe_overrides(variant: str, lr: float, steps: int, run_dir: Path) -> list[str]:
    from mlra_mega.config import load_config
    from mlra_mega.variants import variant_overrides

    model = load_config(BASE, ["model.num_layers=16"]).model
    return [*variant_overrides(variant, model), "model.num_layers=16", f"train.steps={steps}",
            f"optim.lr={lr!r}", f"optim.min_lr={lr / 10!r}", f"optim.warmup_steps={max(1, steps // 10)}",
            f"eval.interval={steps}", "eval.iters=0", "diagnostics.interval=0", "diagnostics.grad_variance_interval=0",
            "tracking.enabled=false", f"train.log_interval={steps}", f"run.dir={run_dir}"]


def outcome(run_dir: Path, steps: int) -> float | None:
    """The probe's validation loss (inf when it diverged), or None if it has not finished."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    from mlra_mega.metrics.names import normalize

    records = [normalize(json.loads(x)) for x in path.read_text().splitlines() if x.strip()]
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r and r["step"] == steps]
    if not train or train[-1]["step"] < steps or not evals:
        return None
    diverged = (any(not math.isfinite(r["train/loss"]) for r in train) or train[-1].get("train/skipped_steps", 0) > 0
                or not math.isfinite(evals[-1]["eval/loss"]))
    return math.inf if diverged else float(evals[-1]["eval/loss"])


def bracket(variant: str, out: Path, steps: int, log=print) -> dict[float, float]:
    from mlra_mega.config import load_config
    from mlra_mega.train.run import train

    results: dict[float, float] = {}
    while (lr := next_rate(results)) is not None:
        run_dir = out / f"{variant}-lr{lr:g}"
        value = outcome(run_dir, steps)
        if value is None:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an interrupted probe: run it again whole
            log(f"[bracket] {variant} lr {lr:g}: probing ({steps} steps at depth 16)")
            try:
                train(load_config(BASE, probe_overrides(variant, lr, steps, run_dir)), log=lambda s: None)
            except Exception as exc:  # noqa: BLE001 - a probe that blows up has diverged
                log(f"[bracket] {variant} lr {lr:g}: failed ({type(exc).__name__}: {str(exc)[:200]})")
            value = outcome(run_dir, steps)
            value = math.inf if value is None else value
        results[lr] = value
        log(f"[bracket] {variant} lr {lr:g}: validation loss {value:.4f}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/paper-depth-cpu/lr-bracket")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = {v: bracket(v, out, args.steps) for v in ("vanilla", "mlra")}
    best = {v: min(r, key=lambda lr: (r[lr], lr)) for v, r in found.items()}
    record = {"steps": args.steps, "depth": 16, "probes": {v: {f"{lr:g}": r[lr] for lr in sorted(r)}
                                                           for v, r in found.items()},
              "lr_star": best["vanilla"], "lr_mlra": best["mlra"]}
    (out / "bracket.json").write_text(json.dumps(record, indent=1) + "\n")
    print("| variant | " + " | ".join(f"{lr:g}" for lr in sorted({x for r in found.values() for x in r})) + " | best |")
    for v, r in found.items():
        rates = sorted({x for rr in found.values() for x in rr})
        cells = [("-" if lr not in r else "diverged" if math.isinf(r[lr]) else f"{r[lr]:.4f}") for lr in rates]
        print(f"| {v} | " + " | ".join(cells) + f" | {best[v]:g} |")
    print(f"lr* = {best['vanilla']:g}, lr_mlra = {best['mlra']:g}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
