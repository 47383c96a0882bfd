"""Communication per step against what each layout must move: bytes and calls per process group,
measured by the ledger (`metrics.comm_interval`), against `comm.expected`'s closed form.

Each layout trains the "mid" model (d 256, 4 layers, 4 heads of 64, seq 128, MLRA; batch 8 in
micro-batches of 4) for a few steps under torchrun with the ledger on; rank 0's last step is
compared with the formula, group by group. "reduce" rows use ds_configs/zero-reduce.json
(DeepSpeed reduces each gradient slice to its owner instead of all-reducing whole buckets).

    python bench/comm.py [--model mid] [--steps 4] [--only NAME ...] [--out bench/results/comm.json]

Two more tables, each a few runs interleaved over rounds (median step time after the warm-up):
`--settings` DeepSpeed's overlap and bucket sizes at DP2 ZeRO-1 / ZeRO-2 (what `zero.overlap_comm`,
`zero.reduce_bucket_size` and `zero.allgather_bucket_size` default to is chosen from it), and
`--loader` the step's wait for its batches with `data.num_workers` 0 (read in the step) and 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, measure, model_overrides, run_worker, table, write_json

LAYOUTS = [  # (name, processes, overrides)
    ("TP2", 2, ["parallel.tensor=2", "zero.stage=1"]),
    ("TP2 SP", 2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "zero.stage=1"]),
    ("DP2 ZeRO-1", 2, ["zero.stage=1"]),
    ("DP2 ZeRO-1 reduce", 2, ["zero.stage=1", f"zero.template={REPO / 'ds_configs' / 'zero-reduce.json'}"]),
    ("DP2 ZeRO-2", 2, ["zero.stage=2"]),
    ("DP2 ZeRO-2 reduce", 2, ["zero.stage=2", f"zero.template={REPO / 'ds_configs' / 'zero-reduce.json'}"]),
    ("DP2 ZeRO-3", 2, ["zero.stage=3"]),
    ("TP2 DP2 ZeRO-1", 4, ["parallel.tensor=2", "zero.stage=1"]),
    # ZeRO-2 with two micro-batches per step: DeepSpeed's reduction in each backward (off) or
    # once per step in its coalescing window (on; the default under sequence parallelism).
    ("DP2 ZeRO-2 2 micro", 2, ["zero.stage=2", "train.micro_batch_size=2", "zero.coalesce_reduction=off"]),
    ("DP2 ZeRO-2 2 micro coalesced", 2, ["zero.stage=2", "train.micro_batch_size=2", "zero.coalesce_reduction=on"]),
    ("TP2 SP DP2 ZeRO-2 per micro", 4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "zero.stage=2",
                                        "train.micro_batch_size=2", "zero.coalesce_reduction=off"]),
    ("TP2 SP DP2 ZeRO-2", 4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "zero.stage=2",
                              "train.micro_batch_size=2"]),
    ("TP2 SP DP2 ZeRO-3", 4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "zero.stage=3",
                              "train.micro_batch_size=2"]),
    ("PP2", 2, ["parallel.pipeline=2", "zero.stage=1"]),
]


def worker(result: Path, overrides: list[str]) -> None:
    """Trains with the ledger on; rank 0 writes its last step's calls per (group, method)."""
    from mlra_mega.config import load_config
    from mlra_mega.train.comm_metrics import CommMetrics
    from mlra_mega.train.run import train

    probe: list[CommMetrics] = []

    class Keep(CommMetrics):  # the run's own ledger callback, kept to read its raw last step
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            probe.append(self)

    import mlra_mega.train.run as run_module

    run_module.CommMetrics = Keep
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    history, _ = train(cfg, log=lambda s: None)
    if int(os.environ.get("RANK", "0")) == 0:  # train() has torn the process group down
        last = probe[0].last
        result.write_text(json.dumps({
            "calls": {f"{g}/{m}": [s.calls, s.bytes, s.time_s] for (g, m), s in last.items()},
            "step_time_s": [m.step_time_s for m in history],
            "data_wait_s": [m.data_wait_s for m in history]}))


def expected_for(overrides: list[str], nproc: int) -> dict:
    """comm.expected's numbers for rank 0 of this layout."""
    from mlra_mega.comm.expected import expected_step
    from mlra_mega.config import load_config
    from mlra_mega.plan import stage_numel

    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*overrides, "model.vocab_size=2048"])
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    dp = nproc // (tp * pp)
    params = sum(stage_numel(cfg, tp, pp, 0))
    return {g: {"bytes": x.bytes, "calls": x.calls}
            for g, x in expected_step(cfg, tp=tp, pp=pp, dp=dp, zero=cfg.zero.stage, params=params).items()}


SETTINGS = [  # (name, overrides) at DP2, for ZeRO-1 and ZeRO-2
    ("no overlap, 5e8 buckets", ["zero.overlap_comm=false"]),
    ("overlap, 5e8 buckets", ["zero.overlap_comm=true"]),
    ("no overlap, 1e6 buckets", ["zero.overlap_comm=false", "zero.reduce_bucket_size=1000000",
                                 "zero.allgather_bucket_size=1000000"]),
    ("overlap, 1e6 buckets", ["zero.overlap_comm=true", "zero.reduce_bucket_size=1000000",
                              "zero.allgather_bucket_size=1000000"]),
]


def rounds_of(runs: dict[str, tuple[int, list[str]]], rounds: int, warmup: int, work: Path) -> dict[str, dict]:
    """Each run once per round, rounds interleaved; per run the median step time and data wait
    after `warmup` steps of each round, and their spread over rounds."""
    from statistics import median

    from bench.common import spread

    got: dict[str, list[dict]] = {k: [] for k in runs}
    for r in range(rounds):
        for name, (nproc, overrides) in runs.items():
            tag = "".join(c if c.isalnum() else "_" for c in name)
            res = run_worker(Path(__file__), nproc, ["--worker", *overrides, f"run.dir={work / f'{tag}-{r}'}"],
                             work / f"{tag}-{r}.json")
            got[name].append(res)
    out = {}
    for name, results in got.items():
        step = [median(x["step_time_s"][warmup:]) for x in results]
        wait = [median(w for w in x["data_wait_s"][warmup:] if w is not None) for x in results]
        out[name] = {"step_s": spread(step), "data_wait_s": spread(wait),
                     "wait_share": median(w / s for w, s in zip(wait, step))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mid")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--calls", action="store_true", help="also print every call kind of each layout")
    ap.add_argument("--cost-rounds", type=int, default=3, help="rounds of the ledger's on / off step time (0: skip)")
    ap.add_argument("--cost-steps", type=int, default=24)
    ap.add_argument("--settings", action="store_true", help="the DeepSpeed overlap / bucket table")
    ap.add_argument("--loader", action="store_true", help="the data-wait table, workers 0 and 2")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the settings and loader tables")
    ap.add_argument("--timed-steps", type=int, default=16, help="steps per run of those tables (median after 4)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "comm.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        worker(Path(args.result), rest)
        return 0
    base = model_overrides(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-comm-"))
    out, rows = {}, []
    for name, nproc, extra in LAYOUTS:
        if args.only and name not in args.only:
            continue
        overrides = [*base, *extra, f"train.steps={args.steps}", "metrics.comm_interval=1", "tracking.enabled=false",
                     "eval.interval=0", "checkpoint.interval=0", f"run.dir={work / name.replace(' ', '_')}"]
        res = run_worker(Path(__file__), nproc, ["--worker", *overrides], work / f"{name.replace(' ', '_')}.json")
        expected = expected_for([*base, *extra], nproc)
        measured: dict[str, list[float]] = {}
        for key, (calls, sent, secs) in res["calls"].items():
            m = measured.setdefault(key.split("/")[0], [0, 0.0, 0.0])
            m[0], m[1], m[2] = m[0] + calls, m[1] + sent, m[2] + secs
        for group in sorted(set(measured) | set(expected)):
            calls, sent, secs = measured.get(group, [0, 0.0, 0.0])
            want = expected.get(group, {"bytes": 0.0, "calls": None})
            ratio = sent / want["bytes"] if want["bytes"] else float("nan")
            rows.append([name, group, sent, want["bytes"], ratio, calls,
                         "-" if want["calls"] is None else want["calls"], 1e3 * secs])
        if args.calls:
            print(table(["group/method", "calls", "bytes", "ms"],
                        [[k, c, b, 1e3 * t] for k, (c, b, t) in sorted(res["calls"].items())], title=name), flush=True)
        res["expected"] = expected
        out[name] = res
    print(table(["layout", "group", "bytes sent", "expected", "ratio", "calls", "expected calls", "ms"], rows,
                title=f"communication of one step on rank 0, model {args.model} (bytes a rank sends, ring algorithms)"))
    cost = {}
    if args.cost_rounds:
        # The ledger's own cost: the same TP2 run with it off and on every step, rounds interleaved.
        common = [*base, "parallel.tensor=2", f"train.steps={args.cost_steps}"]
        cost = measure({"ledger off": (2, [*common, "metrics.comm_interval=0"]),
                        "ledger on": (2, [*common, "metrics.comm_interval=1"])},
                       args.cost_rounds, 6, work, tag="comm-cost")
        off = cost["ledger off"]["step_s"]["median"]
        print(table(["TP2", "step ms", "range %", "x off"],
                    [[k, 1e3 * v["step_s"]["median"], v["step_s"]["range_pct"], v["step_s"]["median"] / off]
                     for k, v in cost.items()],
                    title=f"the ledger's cost, {args.cost_rounds} rounds x {args.cost_steps} steps (median after 6)"))
        cost = {k: {"step_s": v["step_s"], "per_round_s": v["per_round_s"]} for k, v in cost.items()}
    timed = [*base, f"train.steps={args.timed_steps}", "metrics.comm_interval=1", "tracking.enabled=false",
             "eval.interval=0", "checkpoint.interval=0"]
    settings = {}
    if args.settings:
        runs = {f"ZeRO-{z} {name}": (2, [*timed, f"zero.stage={z}", *extra]) for z in (1, 2) for name, extra in SETTINGS}
        settings = rounds_of(runs, args.rounds, 4, work)
        print(table(["DP2", "step ms", "range %"],
                    [[k, 1e3 * v["step_s"]["median"], v["step_s"]["range_pct"]] for k, v in settings.items()],
                    title=f"DeepSpeed's overlap and buckets, {args.rounds} rounds x {args.timed_steps} steps"))
    loader = {}
    if args.loader:
        runs = {f"1 process, {w} workers": (1, [*timed, f"data.num_workers={w}"]) for w in (0, 2)}
        loader = rounds_of(runs, args.rounds, 4, work)
        print(table(["loader", "step ms", "data wait ms", "wait share %"],
                    [[k, 1e3 * v["step_s"]["median"], 1e3 * v["data_wait_s"]["median"], 100 * v["wait_share"]]
                     for k, v in loader.items()],
                    title=f"the step's wait for its batches, {args.rounds} rounds x {args.timed_steps} steps"))
    write_json(args.out, {"model": args.model, "steps": args.steps, "layouts": out, "ledger_cost": cost,
                          "deepspeed_settings": settings, "loader": loader})
    return 0


if __name__ == "__main__":
    sys.exit(main())
