"""TEV's cost: one TEV computation (all-reduce included) timed directly, over the median step time,
at TP = 1 and 2, for the quickstart model and GPT-2 small's width (d 768, vocab 50257, 4 layers,
seq 256); and, as a cross-check, the step-time difference of the trainer with TEV on and off.

Each round runs the trainer twice per layout in fresh processes (bench/trainer_worker.py),
`metrics.tev_interval=1` and `=0` (tracking off, so only TEV differs). At the end of the TEV-on
run every rank computes TEV `--reps` times on the trained model, each call started together
after a barrier and timed to its return (the all-reduce finishes inside it): the median per call
is TEV's time.

    python bench/tev.py [--models quickstart gpt2-small-4l] [--tp 1 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MODELS, REPO, RESULTS, WORKER, model_overrides, run_worker, spread, steady, table, write_json

STEPS = {"quickstart": (80, 10), "gpt2-small-4l": (16, 4)}  # (steps, warm-up) per repetition
GOAL_PCT = 0.5


def _row_formula_before_after(models: list[str], tps: list[int], reps: int = 15) -> list[dict]:
    """The per-row TEV before the fix (torch's `std` over the whole shard) and after (row_tev's
    cache-sized chunks), on a random embedding shard of each model's shape, in this process."""
    import torch

    from mlra_mega.config import load_config
    from mlra_mega.data.tokenizer import load_tokenizer
    from mlra_mega.metrics.tev import row_tev

    out = []
    for model in models:
        overrides = model_overrides(model)
        tok = next(o.split("=", 1)[1] for o in overrides if o.startswith("data.tokenizer="))
        cfg = load_config(REPO / "configs" / "quickstart.yaml",
                          [*overrides, f"model.vocab_size={load_tokenizer(tok).vocab_size}"]).model
        for tp in tps:
            w = torch.randn(cfg.padded_vocab_size // tp, cfg.hidden_size) * 0.02
            timings = {}
            for name, fn in (("before", lambda: w.std(dim=1, unbiased=False)), ("after", lambda: row_tev(w))):
                fn()
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                timings[name] = statistics.median(times)
            out.append({"model": model, "tp": tp, "shape": f"{w.shape[0]} x {w.shape[1]}",
                        "before_s": timings["before"], "after_s": timings["after"]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(STEPS), choices=list(MODELS))
    ap.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50, help="direct TEV timings per TEV-on run")
    ap.add_argument("--out", default=str(RESULTS / "tev.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-tev-"))
    rows, results = [], []
    for model in args.models:
        model_overrides(model)  # data made before any timing
        steps, warmup = STEPS[model]
        for tp in args.tp:
            on, off, tev = [], [], []
            for r in range(args.rounds):
                for mode in ("on", "off"):
                    res = run_worker(WORKER, tp, [f"--tev-reps={args.reps if mode == 'on' else 0}",
                                                  *model_overrides(model), f"parallel.tensor={tp}",
                                                  f"train.steps={steps}", f"metrics.tev_interval={int(mode == 'on')}"],
                                     work / f"{model}-{tp}-{mode}.json")
                    (on if mode == "on" else off).append(steady(res["step_times_s"], warmup))
                    tev += res["tev_times_s"]
                print(f"[tev] {model} TP{tp} round {r + 1}/{args.rounds}: step {1e3 * on[-1]:.1f} ms with TEV, "
                      f"{1e3 * off[-1]:.1f} ms without; TEV {1e3 * statistics.median(tev):.3f} ms", flush=True)
            s_on, s_off, s_tev = spread(on), spread(off), spread(tev)
            share = 100 * s_tev["median"] / s_on["median"]
            diff = 100 * (s_on["median"] - s_off["median"]) / s_off["median"]
            results.append({"model": model, "tp": tp, "step_with_tev_s": s_on, "step_without_tev_s": s_off,
                            "tev_s": s_tev, "tev_share_pct": share, "on_off_difference_pct": diff})
            rows.append([model, tp, 1e3 * s_tev["median"], 1e3 * s_tev["min"], 1e3 * s_tev["max"],
                         1e3 * s_on["median"], s_on["range_pct"], share, 1e3 * s_off["median"], diff])
    before_after = _row_formula_before_after(args.models, args.tp)
    print(table(["model", "TP", "TEV ms", "min", "max", "step ms", "step range %", "TEV share %", "no-TEV step ms",
                 "on-off %"], rows,
                title=f"TEV cost ({args.rounds} rounds; TEV timed {args.reps} times per run; goal <= {GOAL_PCT}% "
                      "at GPT-2 small width)"))
    print(table(["model", "rows x d (one rank)", "before: torch std ms", "after: chunked ms", "speed-up"],
                [[r["model"], r["shape"], 1e3 * r["before_s"], 1e3 * r["after_s"], r["before_s"] / r["after_s"]]
                 for r in before_after], title="the per-row statistic, before and after the fix (one process)"))
    write_json(args.out, {"rounds": args.rounds, "reps": args.reps, "goal_pct": GOAL_PCT, "results": results,
                          "row_formula_before_after": before_after})
    return 0


if __name__ == "__main__":
    sys.exit(main())
