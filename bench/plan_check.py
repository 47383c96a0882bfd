"""`mlra-mega plan`'s memory model against bytes measured on CPU runs, and the pipeline bubble
against measured step times.

For each layout a real run (the quickstart sample data, a 4-layer hidden-64 model, fp32) trains
a few steps; every rank then measures its parameter bytes, optimizer-state bytes
(`train/memory.py`) and the bytes one micro-batch's forward saves for backward on its stage
(`SavedBytes`), which are compared with `plan`'s prediction for that rank's stage. The table
shows the fullest rank of each layout. The bubble part times PP=1 and PP=2 / PP=4 steps with 1,
2, 4 and 8 micro-batches; on 2 CPU cores the stages share the cores, so a pipeline cannot run
faster than one process and the ratio shows the schedule's overhead, not the bubble's idle time.

    python bench/plan_check.py [--out bench/results/plan_check.json] [--skip-bubble]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, run_worker, sample_data, table, write_json

MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=64",
         "model.attention=mlra", "train.global_batch_size=8", "train.micro_batch_size=2", "eval.interval=0",
         "tracking.enabled=false", "metrics.tev_interval=0", "checkpoint.interval=0"]
# name -> (processes, overrides)
LAYOUTS = {
    "TP1 ZeRO-0": (1, ["zero.stage=0"]),
    "TP1 ZeRO-1 recompute full": (1, ["zero.stage=1", "train.recompute=full"]),
    "TP2 ZeRO-1": (2, ["parallel.tensor=2", "zero.stage=1"]),
    "DP2 ZeRO-3": (2, ["zero.stage=3", "model.tie_embeddings=false"]),
    "PP2 ZeRO-1": (2, ["parallel.pipeline=2"]),
    "PP2 untied selective": (2, ["parallel.pipeline=2", "model.tie_embeddings=false", "train.recompute=selective"]),
    "TP2 x PP2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "PP2 x DP2": (4, ["parallel.pipeline=2"]),
    "PP4": (4, ["parallel.pipeline=4"]),
    "TP2 x DP2 ZeRO-2 SP": (4, ["parallel.tensor=2", "zero.stage=2", "parallel.sequence_parallel=true"]),
}


def worker(args: list[str], result: Path) -> None:
    import torch
    import torch.distributed as dist

    from mlra_mega.config import load_config
    from mlra_mega.plan import Layout, activation_bytes, stage_numel
    from mlra_mega.train.callbacks import Callback
    from mlra_mega.train.memory import SavedBytes, optimizer_state_bytes, parameter_bytes
    from mlra_mega.train.run import train

    import os
    import socket

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:  # one process: kept initialised after train(), for the gather below
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    steps, rest = int(args[0]), args[1:]
    cfg = load_config(None, [*MODEL, f"train.steps={steps}", *rest])
    clock: list[float] = []

    class Measure(Callback):
        def on_step_end(self, trainer, metrics) -> None:
            clock.append(time.perf_counter())

        def on_fit_end(self, trainer) -> None:
            ctx, model = trainer.ctx, trainer.model
            self.model_cfg = trainer.model_cfg
            self.params = parameter_bytes(model)
            self.optimizer = optimizer_state_bytes(trainer.engine)
            b, s = cfg.train.micro_batch_size, cfg.model.seq_length
            tokens = torch.randint(0, trainer.model_cfg.vocab_size, (b, s))
            positions = torch.arange(s).unsqueeze(0).expand(b, s)
            if not ctx.first_stage:
                local = s // ctx.tp_size if cfg.parallel.sequence_parallel else s
                model.set_input_tensor(torch.zeros(local, b, cfg.model.hidden_size, requires_grad=True))
            model.train()
            with SavedBytes(model) as saved:
                out = model(tokens, positions, None, labels=tokens)
            del out
            self.activations = saved.bytes
            self.stage, self.tp, self.pp = ctx.pp_rank, ctx.tp_size, ctx.pp_size
            self.dp = ctx.dp_size

    probe = Measure()
    train(cfg, [probe], log=lambda s: None)
    cfg = dataclasses.replace(cfg, model=probe.model_cfg)  # the vocabulary is the tokenizer's
    lay = Layout(probe.tp, probe.pp, probe.dp, cfg.zero.stage, cfg.train.recompute)
    layers, other = stage_numel(cfg, lay.tp, lay.pp, probe.stage)
    pb = 4
    n = layers + other
    predicted = {
        "params": pb * n / (lay.dp if lay.zero == 3 else 1),
        "optimizer": 8.0 * n if lay.zero == 0 else 12.0 * n / lay.dp,
        "activations": activation_bytes(cfg, lay.tp, lay.pp, probe.stage, lay.recompute,
                                        cfg.parallel.sequence_parallel),
    }
    measured = {"params": probe.params["layers"] + probe.params["other"], "optimizer": probe.optimizer,
                "activations": probe.activations}
    step_s = [b - a for a, b in zip(clock, clock[1:])]
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, {"rank": dist.get_rank(), "stage": probe.stage, "predicted": predicted,
                                  "measured": measured, "step_s": step_s})
    if dist.get_rank() == 0:
        result.write_text(json.dumps({"ranks": rows}))


def _ratio(pred: float, meas: float) -> float:
    return pred / meas - 1 if meas else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "plan_check.json"))
    ap.add_argument("--skip-bubble", action="store_true")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, Path(args.result))
        return 0
    tok, prefix = sample_data()
    data = [f"data.tokenizer={tok}", f"data.paths=[{prefix}]"]
    work = Path(tempfile.mkdtemp(prefix="plan-check-"))
    memory = []
    for i, (name, (nproc, extra)) in enumerate(LAYOUTS.items()):
        res = run_worker(Path(__file__), nproc, ["--worker", "2", *data, f"run.root={work}", *extra],
                         work / f"mem{i}.json")
        worst = max(res["ranks"], key=lambda r: sum(r["measured"].values()))
        row = {"layout": name, "rank": worst["rank"], "stage": worst["stage"]}
        for k in ("params", "optimizer", "activations"):
            row[f"{k}_predicted"], row[f"{k}_measured"] = worst["predicted"][k], worst["measured"][k]
            row[f"{k}_error"] = _ratio(worst["predicted"][k], worst["measured"][k])
        row["max_error_all_ranks"] = {k: max(abs(_ratio(r["predicted"][k], r["measured"][k])) for r in res["ranks"])
                                      for k in ("params", "optimizer", "activations")}
        memory.append(row)
        print(f"[plan-check] {name}: " + ", ".join(f"{k} {row[f'{k}_error']:+.2%}"
                                                   for k in ("params", "optimizer", "activations")), flush=True)
    print(table(["layout", "rank", "params B", "pred", "optimizer B", "pred", "activations B", "pred"],
                [[r["layout"], r["rank"], r["params_measured"], f"{r['params_error']:+.2%}", r["optimizer_measured"],
                  f"{r['optimizer_error']:+.2%}", r["activations_measured"], f"{r['activations_error']:+.2%}"]
                 for r in memory]))
    bubble = []
    if not args.skip_bubble:
        for pp in (1, 2, 4):
            for micro in (1, 2, 4, 8):
                extra = [f"train.global_batch_size={2 * micro}", f"parallel.pipeline={pp}"]
                res = run_worker(Path(__file__), pp, ["--worker", "12", *data, f"run.root={work}", *extra],
                                 work / f"bubble{pp}-{micro}.json")
                times = sorted(res["ranks"][0]["step_s"][2:])
                bubble.append({"pp": pp, "micro_batches": micro, "step_s": times[len(times) // 2],
                               "predicted_bubble": (pp - 1) / (micro + pp - 1)})
                print(f"[plan-check] PP{pp} m={micro}: {bubble[-1]['step_s'] * 1e3:.1f} ms/step", flush=True)
        base = {b["micro_batches"]: b["step_s"] for b in bubble if b["pp"] == 1}
        for b in bubble:
            b["x_pp1"] = b["step_s"] / base[b["micro_batches"]]
            b["ideal_x_pp1_on_shared_cores"] = 1 / (1 - b["predicted_bubble"]) if b["pp"] > 1 else 1.0
        print(table(["PP", "micro-batches", "step ms", "x PP=1", "predicted bubble"],
                    [[b["pp"], b["micro_batches"], b["step_s"] * 1e3, b["x_pp1"], b["predicted_bubble"]]
                     for b in bubble]))
    write_json(args.out, {"memory": memory, "bubble": bubble})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
