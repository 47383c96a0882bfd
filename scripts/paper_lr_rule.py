"""The learning-rate rule of the depth study, applied to the probe sweep's runs (configs/paper/README.md).

    python scripts/paper_lr_rule.py SWEEP_DIR [--factor 1.0]   -> prints the learning rate

A probe run "trains without divergence" when every loss is finite, no step was skipped, no loss
spike was counted, and the mean of its last 10 losses is below the mean of its first 10. The rule:
the largest such rate, times the fixed factor. Fixed before the sweep; never picked after it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlra_mega.metrics.names import normalize  # noqa: E402


def trains(records: list[dict]) -> bool:
    losses = [r["train/loss"] for r in records]
    return (len(losses) >= 20 and all(math.isfinite(x) for x in losses)
            and records[-1].get("train/skipped_steps", 0) == 0 and records[-1].get("stability/loss_spikes", 0) == 0
            and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--factor", type=float, default=1.0)
    args = parser.parse_args()
    ok = []
    for run in sorted(Path(args.sweep_dir).iterdir()):
        if not (run / "metrics.jsonl").is_file():
            continue
        lr = yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"]
        records = [r for r in (normalize(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()
                               if x.strip()) if "train/loss" in r]
        verdict = trains(records)
        print(f"[lr rule] lr {lr:g}: {'trains' if verdict else 'diverges'} "
              f"(first 10 {sum(r['train/loss'] for r in records[:10]) / 10:.3f}, "
              f"last 10 {sum(r['train/loss'] for r in records[-10:]) / 10:.3f})", file=sys.stderr)
        if verdict:
            ok.append(lr)
    if not ok:
        print("error: no probe rate trains; lower the probe's grid", file=sys.stderr)
        return 2
    print(f"{max(ok) * args.factor:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
