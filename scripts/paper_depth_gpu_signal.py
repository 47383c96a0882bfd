"""A first signal on the depth question on one GPU in about 5 minutes (the depth study's GPU profile).

    python scripts/paper_depth_gpu_signal.py [--out runs/paper-depth-gpu-signal] [--budget-s 300]
    python scripts/paper_depth_gpu_signal.py --dry-run     # the same loop on CPU, tiny (CI runs it)

Width 256 (4 heads), sequence 256, bf16, depths 6 and 24, the four main variants (vanilla,
scaled_embed, embed_ln, mlra) at two rates (lr* and 4 lr* of the CPU bracket: 1e-3, 4e-3): 16
runs, all inside this one process (start-up costs seconds per process), deepest first. Each run's
steps are fixed up front from the budget (so every run trains alike); validation on the whole
held-out split at the end. Each finished run is appended to `results.jsonl` at once (a run cut off
by the budget or a crash loses only itself), and a rerun skips what is there. The end prints
MLRA's validation perplexity divided by each baseline's, per depth and rate.
Data: the CPU study's corpus (`runs/paper-data`, made by scripts/paper_depth_cpu.sh) or
--tokenizer / --data.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("vanilla", "scaled_embed", "embed_ln", "mlra")
RATES = (1e-3, 4e-3)
PROFILES = {
    "gpu": {"depths": (24, 6), "steps": 300, "model": ["model.hidden_size=256", "model.num_heads=4",
                                                       "model.seq_length=256"],
            "train": ["train.global_batch_size=32", "train.micro_batch_size=32", "train.precision=bf16"]},
    "dry-run": {"depths": (2, 1), "steps": 3, "model": ["model.hidden_size=64", "model.num_heads=4",
                                                        "model.seq_length=32"],
                "train": ["train.global_batch_size=4", "train.micro_batch_size=4", "train.precision=fp32"]},
}


def run_overrides(profile: dict, variant: str, depth: int, lr: float, steps: int, tokenizer: str, data: str,
                  run_dir: Path) -> list[str]:
    from mlra_mega.config import load_config
    from mlra_mega.variants import variant_overrides

    base = [*profile["model"], f"model.num_layers={depth}", "model.vocab_size=null"]
    model = load_config(None, [*base, "model.vocab_size=4096"]).model
    return [*base, *variant_overrides(variant, model), *profile["train"], f"train.steps={steps}",
            f"optim.lr={lr!r}", "optim.min_lr_ratio=0.1", f"optim.warmup_steps={max(1, steps // 10)}",
            "optim.schedule=cosine", f"eval.interval={steps}", "eval.iters=0", "metrics.tev_interval=1",
            "tracking.enabled=false", f"train.log_interval={max(1, steps // 3)}", f"data.tokenizer={tokenizer}",
            f"data.paths=[{data}]", "data.split=95,5,0", f"run.dir={run_dir}", "checkpoint.resume=never"]


def summarize(history: list, run_dir: Path, warmup: int) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [{"val_loss": r["eval/loss"], "val_ppl": r["eval/ppl"]} for r in records if "eval/loss" in r]
    after = [m for m in history if m.step > warmup and math.isfinite(m.grad_norm)]
    finite = all(math.isfinite(m.loss) for m in history) and not history[-1].skipped_steps
    return {"val_loss": evals[-1]["val_loss"] if evals and finite else math.inf,
            "val_ppl": evals[-1]["val_ppl"] if evals and finite else math.inf,
            "tev_mean": history[-1].tev_mean, "max_grad_norm_after_warmup": max((m.grad_norm for m in after),
                                                                                default=None),
            "skipped_steps": history[-1].skipped_steps, "steps": history[-1].step}


def ratios(results: list[dict]) -> list[str]:
    by = {(r["depth"], r["lr"], r["variant"]): r["val_ppl"] for r in results}
    lines = ["| depth | lr | " + " | ".join(f"mlra / {v}" for v in VARIANTS if v != "mlra") + " |",
             "|---|---|" + "---|" * (len(VARIANTS) - 1)]
    for depth, lr in sorted({(r["depth"], r["lr"]) for r in results}):
        mlra = by.get((depth, lr, "mlra"))
        cells = [f"{mlra / by[(depth, lr, v)]:.3f}" if mlra and (depth, lr, v) in by and math.isfinite(mlra)
                 and math.isfinite(by[(depth, lr, v)]) else "-" for v in VARIANTS if v != "mlra"]
        lines.append(f"| {depth} | {lr:g} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall time for all runs (GPU profile)")
    parser.add_argument("--tokenizer", default=str(REPO / "runs" / "paper-data" / "tokenizer"))
    parser.add_argument("--data", default=str(REPO / "runs" / "paper-data" / "docs"))
    parser.add_argument("--dry-run", action="store_true", help="the same loop on CPU with a tiny model")
    args = parser.parse_args(argv)
    from mlra_mega.config import load_config
    from mlra_mega.train.run import train

    name = "dry-run" if args.dry_run else "gpu"
    profile = PROFILES[name]
    out = Path(args.out or REPO / "runs" / f"paper-depth-gpu-signal-{name}")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = [json.loads(x) for x in results_path.read_text().splitlines()] if results_path.is_file() else []
    seen = {(r["variant"], r["depth"], r["lr"]) for r in done}
    start = time.perf_counter()
    plan = [(v, d, lr) for d in profile["depths"] for lr in RATES for v in VARIANTS]
    for i, (variant, depth, lr) in enumerate(plan, 1):
        if (variant, depth, lr) in seen:
            continue
        if not args.dry_run and time.perf_counter() - start > args.budget_s:
            print(f"[signal] budget of {args.budget_s:g}s spent after {i - 1} of {len(plan)} runs; rerun to go on")
            break
        run_dir = out / f"L{depth}-{variant}-lr{lr:g}"
        steps = profile["steps"]
        t0 = time.perf_counter()
        cfg = load_config(None, run_overrides(profile, variant, depth, lr, steps, args.tokenizer, args.data,
                                              run_dir if not run_dir.exists() else out / f"{run_dir.name}-{int(t0)}"))
        history, used_dir = train(cfg, log=lambda s: None)
        record = {"variant": variant, "depth": depth, "lr": lr, **summarize(history, used_dir, cfg.optim.warmup_steps),
                  "seconds": round(time.perf_counter() - t0, 1)}
        with results_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done.append(record)
        print(f"[signal] {i}/{len(plan)} L{depth} {variant} lr {lr:g}: val ppl {record['val_ppl']:.2f} "
              f"({record['seconds']:.0f}s)", flush=True)
    print("\n".join(ratios(done)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
