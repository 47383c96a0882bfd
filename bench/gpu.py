"""The GPU path on one GPU: correctness first, then speed, for MLRA and MHA GPTs of about 1.3B
parameters (configs/gpu/gpt-1.3b.yaml: sequence 2048, bf16, ZeRO-1, fused paths, tracking off).

1. TP = 2 against TP = 1 (the model issue's equivalence: logits and every gathered gradient, each
   attention and embedding variant of the tiny test model), as two processes sharing the GPU
   over gloo with CUDA tensors (NCCL refuses two ranks on one GPU). Passes at <= 1e-4.
2. Per model, a few steps in fp32 and the same steps in bf16 from the same initialisation and
   data: every step's loss within 2e-2 (relative) of fp32's.
3. The bf16 run goes on: tokens/s, achieved TFLOP/s and MFU (metrics.peak_tflops) over the steps
   after warm-up, peak GPU memory, and TEV's share of the step (TEV timed directly on the trained
   model, synchronised, and checked against a float64 CPU computation of the same weights).
Each model runs in a fresh process; the table is printed last and the JSON written.

    python bench/gpu.py [--out bench/results/gpu.json]
    python bench/gpu.py --dry-run      # the same code path on CPU with a tiny model (CI runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, RESULTS, run_worker, table, write_json

CONFIG = REPO / "configs" / "gpu" / "gpt-1.3b.yaml"
ATTENTIONS = ("mlra", "mha")
TP_TOL = 1e-4
LOSS_RTOL = 2e-2
TEV_RTOL = 1e-5
# (check steps compared with fp32, warm-up steps after them, timed steps)
STEPS = {"gpu": (3, 3, 15), "dry-run": (3, 1, 3)}
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=64",
        "train.global_batch_size=4", "train.micro_batch_size=4", "metrics.peak_tflops=null", "optim.fused=true"]


def _overrides(attention: str, precision: str, steps: int, dry_run: bool, work: Path) -> list[str]:
    from mlra_mega.quickstart import prepare_sample_data

    tok, prefix = prepare_sample_data(work / "data", log=lambda s: None)
    return [f"model.attention={attention}", f"train.precision={precision}", f"train.steps={steps}",
            f"data.tokenizer={tok}", f"data.paths=[{prefix}]", f"run.dir={work / f'run-{attention}-{precision}'}",
            "train.log_interval=1000000", *(TINY if dry_run else [])]


def run_model(attention: str, precision: str, steps: int, tev_reps: int, dry_run: bool, work: Path) -> dict:
    """One training run in this process; what bench needs of it."""
    import numpy as np
    import torch

    from mlra_mega.config import load_config
    from mlra_mega.metrics.tev import compute_tev
    from mlra_mega.model.build import count_parameters, flops_per_token, fusion_flags
    from mlra_mega.model.specs import core_attention_class
    from mlra_mega.train.callbacks import Callback
    from mlra_mega.train.run import train
    from mlra_mega.metrics.tev import embedding_tev

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out: dict = {"losses": [], "step_times_s": [], "tev_times_s": []}
    last = [None]

    class Measure(Callback):
        def on_step_end(self, trainer, metrics) -> None:
            now = time.perf_counter()
            if last[0] is not None:
                out["step_times_s"].append(now - last[0])
            last[0] = now
            out["losses"].append(metrics.loss)

        def on_fit_end(self, trainer) -> None:
            model_cfg, train_cfg = trainer.model_cfg, trainer.train_cfg
            for _ in range(tev_reps):
                sync()
                start = time.perf_counter()
                embedding_tev(trainer.model, model_cfg.vocab_size, trainer.ctx.tp_group)
                sync()
                out["tev_times_s"].append(time.perf_counter() - start)
            weight = trainer.model.embedding.word_embeddings.weight.detach()
            got = compute_tev(weight, model_cfg.vocab_size)
            rows = weight[:model_cfg.vocab_size].double().cpu().numpy().std(axis=1)
            out["tev_check_rel"] = max(abs(got.mean - rows.mean()) / rows.mean(), abs(got.std - rows.std()) / rows.std())
            out.update(parameters=count_parameters(model_cfg), flops_per_token=flops_per_token(model_cfg),
                       tokens_per_step=train_cfg.global_batch_size * model_cfg.seq_length,
                       peak_tflops=trainer.metrics_cfg.peak_tflops, attention_class=core_attention_class(model_cfg).__name__,
                       fusions={k: v for k, v in fusion_flags(model_cfg).items() if v},
                       max_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                       device=torch.cuda.get_device_name() if cuda else "cpu")

    base = CONFIG if not dry_run else REPO / "configs" / "quickstart.yaml"
    cfg = load_config(base, _overrides(attention, precision, steps, dry_run, work) +
                      (["tracking.enabled=false", "eval.interval=0"] if dry_run else []))
    train(cfg, [Measure()], log=lambda s: None)
    out["tev_check_rel"] = float(np.float64(out["tev_check_rel"]))
    return out


def tp_check() -> dict:
    """The model issue's TP = 2 against TP = 1 equivalence, every variant, on this machine's
    device (a GPU where there is one), over gloo."""
    import torch.distributed as dist

    from tests.model.test_tensor_parallel import equivalence

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    result = equivalence()
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, result)
    return {"per_rank": per_rank, "max_logit_diff": max(v[0] for r in per_rank for v in r.values()),
            "max_grad_diff": max(v[1] for r in per_rank for v in r.values())}


def summarise(model: str, fp32: dict, bf16: dict, check: int, warmup: int) -> dict:
    n = min(check, len(fp32["losses"]), len(bf16["losses"]))
    rel = [abs(b - f) / abs(f) for f, b in zip(fp32["losses"][:n], bf16["losses"][:n])]
    timed = bf16["step_times_s"][check + warmup - 1:]  # step-to-step gaps after the check and warm-up steps
    step = statistics.median(timed)
    tokens_s = bf16["tokens_per_step"] / step
    tflops = bf16["flops_per_token"] * tokens_s / 1e12
    tev = statistics.median(bf16["tev_times_s"])
    return {"model": model, "parameters": bf16["parameters"], "step_s": step, "step_min_s": min(timed),
            "step_max_s": max(timed), "timed_steps": len(timed), "tokens_per_s": tokens_s, "tflops": tflops,
            "mfu": tflops / bf16["peak_tflops"] if bf16["peak_tflops"] else None, "tev_s": tev,
            "tev_share_pct": 100 * tev / step, "max_memory_gib": bf16["max_memory_gib"],
            "loss_fp32": fp32["losses"][:n], "loss_bf16": bf16["losses"][:n], "loss_max_rel_diff": max(rel),
            "loss_ok": max(rel) <= LOSS_RTOL, "tev_check_rel": bf16["tev_check_rel"],
            "tev_ok": bf16["tev_check_rel"] <= TEV_RTOL, "attention_class": bf16["attention_class"],
            "fusions": bf16["fusions"], "device": bf16["device"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU through the same code path")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/gpu.json, gpu-dry-run.json)")
    ap.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    ap.add_argument("--tev-reps", type=int, default=20)
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)  # tp | run ATTENTION PRECISION STEPS | runs JSON
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    mode = "dry-run" if args.dry_run else "gpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-"))

    if args.worker is not None:
        if args.worker[0] == "tp":
            result = tp_check()
            if os.environ.get("RANK", "0") == "0":
                Path(args.result).write_text(json.dumps(result))
        elif args.worker[0] == "runs":  # the dry run: every model run in this one process
            result = {f"{a}-{p}": run_model(a, p, int(n), args.tev_reps if p == "bf16" else 0, args.dry_run, work)
                      for a, p, n in json.loads(args.worker[1])}
            Path(args.result).write_text(json.dumps(result))
        else:
            _, attention, precision, steps = args.worker
            result = run_model(attention, precision, int(steps), args.tev_reps if precision == "bf16" else 0,
                               args.dry_run, work)
            Path(args.result).write_text(json.dumps(result))
        return 0

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU is visible; run with --dry-run to check the code path on the CPU")
    started = time.monotonic()
    common = ["--work", str(work), *(["--dry-run"] if args.dry_run else [])]
    _overrides("mha", "fp32", 1, args.dry_run, work)  # data made once, before the workers
    tp = run_worker(Path(__file__), 2, ["--worker", "tp", *common], work / "tp.json")
    print(f"[gpu] TP=2 against TP=1 ({'GPU, gloo' if not args.dry_run else 'CPU, gloo'}): max |d logits| "
          f"{tp['max_logit_diff']:.2e}, max |d grad| {tp['max_grad_diff']:.2e} (pass <= {TP_TOL:g})", flush=True)
    check, warmup, timed = STEPS[mode]
    plan = [(a, p, n) for a in ATTENTIONS for p, n in (("fp32", check), ("bf16", check + warmup + timed))]
    done = {}
    if args.dry_run:  # tiny models: process start-up would cost more than the runs
        done = run_worker(Path(__file__), 1, ["--worker", "runs", json.dumps(plan), "--tev-reps",
                                              str(args.tev_reps), *common], work / "runs.json", timeout_s=1800)
    rows, models = [], []
    for attention in ATTENTIONS:
        runs = {}
        for precision, steps in (("fp32", check), ("bf16", check + warmup + timed)):
            # On a GPU each run has a process of its own: its peak memory is its own.
            runs[precision] = done.get(f"{attention}-{precision}") or run_worker(
                Path(__file__), 1, ["--worker", "run", attention, precision, str(steps), "--tev-reps",
                                    str(args.tev_reps), *common], work / f"{attention}-{precision}.json", timeout_s=1800)
            print(f"[gpu] {attention} {precision}: {steps} steps, losses {[round(x, 4) for x in runs[precision]['losses'][:check]]}",
                  flush=True)
        s = summarise(attention, runs["fp32"], runs["bf16"], check, warmup)
        models.append(s)
        rows.append([attention, s["parameters"] / 1e9, 1e3 * s["step_s"], s["tokens_per_s"], s["tflops"],
                     100 * s["mfu"] if s["mfu"] is not None else "n/a", 1e3 * s["tev_s"], s["tev_share_pct"],
                     s["max_memory_gib"] if s["max_memory_gib"] is not None else "n/a", s["loss_max_rel_diff"]])
    ok = tp["max_logit_diff"] <= TP_TOL and tp["max_grad_diff"] <= TP_TOL and all(m["loss_ok"] and m["tev_ok"]
                                                                                 for m in models)
    device = models[0]["device"]
    print(table(["attention", "params B", "step ms", "tokens/s", "TFLOP/s", "MFU %", "TEV ms", "TEV share %",
                 "peak GiB", "bf16/fp32 loss rel"], rows,
                title=f"{device}: {'tiny dry-run model' if args.dry_run else CONFIG.name}, bf16, ZeRO-1; "
                      f"median of {timed} steps after {check + warmup}; attention {models[0]['attention_class']}, "
                      f"fusions {sorted(models[0]['fusions']) or 'none'}"))
    print(f"[gpu] correctness: {'PASS' if ok else 'FAIL'} (TP <= {TP_TOL:g}, bf16 loss within {LOSS_RTOL:g} of fp32, "
          f"TEV within {TEV_RTOL:g} of float64); {time.monotonic() - started:.0f}s in all")
    write_json(args.out or RESULTS / ("gpu-dry-run.json" if args.dry_run else "gpu.json"),
               {"mode": mode, "steps": {"check": check, "warmup": warmup, "timed": timed}, "tp_check": tp,
                "models": models, "correct": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
