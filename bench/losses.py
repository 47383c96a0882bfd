"""The trainer's per-step losses and gradient norms over a few steps on one process, to compare two
versions of the code or two settings (e.g. optimizer kernels) for behaviour changes.

    python bench/losses.py [--model gpt2-small-4l] [--steps 8] [--set optim.fused=false ...] [--out F]
    PYTHONPATH=/path/to/other/checkout python bench/losses.py ...   # the same run on another version

Prints the losses and, with `--against F` (another run's JSON), the largest absolute difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: PYTHONPATH may name another checkout

from bench.common import MODELS, REPO, RESULTS, model_overrides, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small-4l", choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--against", help="another run's JSON: print the largest loss difference")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import mlra_mega
    from mlra_mega.config import load_config
    from mlra_mega.train.run import train

    work = Path(tempfile.mkdtemp(prefix="bench-losses-"))
    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      [*model_overrides(args.model), "model.attention=mha", f"train.steps={args.steps}",
                       "eval.interval=0", "tracking.enabled=false", f"run.dir={work / 'run'}", f"run.root={work}",
                       *args.set])
    try:
        history, _ = train(cfg, [], log=lambda s: None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    losses, norms = [m.loss for m in history], [m.grad_norm for m in history]
    print("losses:", ", ".join(f"{x:.9f}" for x in losses))
    result = {"code": str(Path(mlra_mega.__file__).parent), "model": args.model, "settings": args.set,
              "losses": losses, "grad_norms": norms}
    if args.against:
        other = json.loads(Path(args.against).read_text())["losses"]
        diff = max(abs(a - b) for a, b in zip(losses, other))
        print(f"largest |loss difference| against {args.against}: {diff:.3g}")
        result["max_abs_loss_difference"] = diff
    write_json(args.out or RESULTS / f"losses-{args.model}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
