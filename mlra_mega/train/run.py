"""One training run from a validated config: layout, data, model, engine, trainer, run directory.

`train(cfg)` is what `mlra-mega train` and the quickstart call, under any launcher: it checks the
layout against the world size (one-line ConfigErrors), sets up parallel state, loads the
tokenizer and datasets (the model's vocabulary defaults to the tokenizer's), builds the model and
the DeepSpeed engine, writes the resolved config and the effective DeepSpeed config to the run
directory (rank 0), and runs the trainer with its callbacks.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from mlra_mega import distributed
from mlra_mega.config import ConfigError, RunConfig, flatten, public_dict
from mlra_mega.errors import MlraMegaError, PeerLost
from mlra_mega.data.datasets import SampleOrder, TrainBatches, build_datasets
from mlra_mega.data.tokenizer import check_vocab, load_tokenizer
from mlra_mega.distributed import ParallelContext, launch_env
from mlra_mega.train.callbacks import CONFIG_CHANGES, Callback, ConsoleLogger, MetricsFile, RunSummary
from mlra_mega.train.rank_logs import HangDrill, RankLog, Watchdog
from mlra_mega.train.run_lock import RunLock
from mlra_mega.train.checkpoint import (Checkpointer, check_compatible, checkpoint_problem, find_checkpoint,
                                        read_sidecar)
from mlra_mega.train.profiler import StepProfiler
from mlra_mega.train.stability import stability_callbacks
from mlra_mega.train.signals import PREEMPTED, PreemptionGuard, install_handlers, restore_handlers
from mlra_mega.train.trainer import StepMetrics, Trainer

__all__ = ["validate_layout", "resolve_run_dir", "train"]


def validate_layout(cfg: RunConfig, world_size: int) -> int:
    """The data-parallel size of this layout, or a ConfigError saying what does not fit."""
    tp = cfg.parallel.tensor
    if world_size % tp:
        raise ConfigError("parallel.tensor", f"{tp} does not divide the world size {world_size}",
                          "launch a multiple of parallel.tensor processes, or change parallel.tensor")
    dp = world_size // tp
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError("train.global_batch_size",
                          f"{t.global_batch_size} is not divisible by micro_batch_size x data-parallel size "
                          f"= {t.micro_batch_size} x {dp} (world {world_size} / tensor {tp})",
                          f"use a multiple of {t.micro_batch_size * dp}, or change train.micro_batch_size")
    if cfg.diagnostics.grad_variance_interval and t.global_batch_size // t.micro_batch_size < 2:
        raise ConfigError("diagnostics.grad_variance_interval", f"needs at least two micro-batches per step, "
                          f"this layout has {t.global_batch_size // t.micro_batch_size}",
                          "lower train.micro_batch_size, or set it to 0")
    if cfg.faults.inject_nan_step is not None and cfg.faults.inject_nan_rank >= world_size:
        raise ConfigError("faults.inject_nan_rank", f"{cfg.faults.inject_nan_rank} is not a rank of this "
                          f"{world_size}-process job", f"give a rank below {world_size}")
    if cfg.faults.inject_hang_step is not None and cfg.faults.inject_hang_rank >= world_size:
        raise ConfigError("faults.inject_hang_rank", f"{cfg.faults.inject_hang_rank} is not a rank of this "
                          f"{world_size}-process job", f"give a rank below {world_size}")
    return dp


def resolve_run_dir(cfg: RunConfig, ctx: ParallelContext) -> Path:
    """`run.dir`, or `<run.root>/<experiment>/<run.name or rank 0's timestamp>`."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    parent = Path(cfg.run.root) / cfg.tracking.experiment
    name = [cfg.run.name]
    if name[0] is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name[0], n = stamp, 1
        while (parent / name[0]).exists():  # a new directory per run, even within one second
            n += 1
            name[0] = f"{stamp}-{n}"
    if ctx.world_size > 1:
        dist.broadcast_object_list(name, src=0)  # one name for the whole job
    return parent / name[0]


def _checkpoint_to_resume(cfg: RunConfig, run_dir: Path, tp: int, dp: int, log: Callable[[str], None]):
    """(checkpoint, sidecar) to continue from, per `checkpoint.resume`, or (None, None)."""
    resume = cfg.checkpoint.resume
    if resume == "never":
        if (run_dir / "metrics.jsonl").exists():
            raise ConfigError("checkpoint.resume", f"is never, but {run_dir} already holds a run",
                              "give a new run.dir, or use checkpoint.resume=auto to continue it")
        return None, None
    if resume == "auto":
        ckpt = find_checkpoint(run_dir, verify_hashes=True, log=log)
        if ckpt is None:
            _refuse_to_start_over(run_dir)
            return None, None
    else:
        ckpt = find_checkpoint(Path(resume), verify_hashes=True, log=log)
        if ckpt is None:
            raise ConfigError("checkpoint.resume", f"no complete checkpoint at {resume}",
                              "give a checkpoint directory, a run's checkpoints/ directory or a run directory")
    sidecar = read_sidecar(ckpt)
    check_compatible(ckpt, sidecar, cfg, tp, dp)
    if sidecar["step"] >= cfg.train.steps:
        raise ConfigError("checkpoint.resume", f"the run of {ckpt.path} already finished (step {sidecar['step']}, "
                          f"train.steps={cfg.train.steps})",
                          "start a new run.dir, or use checkpoint.resume=never with a new run.dir")
    return ckpt, sidecar


def _refuse_to_start_over(run_dir: Path) -> None:
    """A run directory that holds a run but no usable checkpoint is never trained over from step 0."""
    root = run_dir / "checkpoints"
    tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step")) if root.is_dir() else []
    if tags:
        problems = "; ".join(f"{t.name}: {checkpoint_problem(t, verify_hashes=True)}" for t in tags[-3:])
        raise ConfigError("checkpoint.resume", f"auto found no usable checkpoint in {root} ({problems})",
                          "resume from a good copy with --resume PATH, or start afresh with --resume never "
                          "and a new run.dir")
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError("checkpoint.resume", f"auto found {run_dir / 'metrics.jsonl'} but no checkpoint to "
                          "continue it from (the run stopped before its first checkpoint)",
                          "start afresh with --resume never and a new run.dir (or delete this one)")


_NOT_SETTINGS = ("checkpoint.resume",)  # how this start was asked for, not a setting of the run


def config_changes(saved: dict, cfg: RunConfig) -> dict[str, list]:
    """{key: [checkpoint's value, this run's]} for every setting that differs (both masked)."""
    old, new = flatten(saved), flatten(public_dict(cfg))
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in _NOT_SETTINGS}


def _record_config_changes(cfg: RunConfig, sidecar: dict, run_dir: Path, log: Callable[[str], None]) -> None:
    """One line in the log and one record in config_changes.jsonl per resume that changed settings
    (MLflow params cannot be overwritten: the tracker tags the run with this file's last record)."""
    changes = config_changes(sidecar["config"], cfg)
    if not changes:
        return
    text = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
    log(f"[train] resumed at step {sidecar['step']} with changed settings: {text}; the schedule follows this "
        "config from here")
    with (run_dir / CONFIG_CHANGES).open("a") as f:
        f.write(json.dumps({"step": sidecar["step"], "time": time.time(), "changes": changes}) + "\n")


def _with_tokenizer_vocab(cfg: RunConfig):
    if cfg.data.tokenizer is None:
        raise ConfigError("data.tokenizer", "is not set", "give the tokenizer directory that made data.paths")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = check_vocab(cfg.model.vocab_size, tokenizer)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    cfg.validate()
    return cfg, tokenizer


def _lock_run_dir(cfg: RunConfig, ctx: ParallelContext, run_dir: Path, log: Callable[[str], None]
                  ) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank raises the same error when it cannot."""
    lock, refusal = None, [None]
    if ctx.is_main:
        try:
            lock = RunLock(run_dir, cfg.faults.lock_stale_s, log)
            lock.acquire()
        except ConfigError as exc:
            lock, refusal[0] = None, (exc.field, exc.problem, exc.fix)
    if ctx.world_size > 1:
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise ConfigError(*refusal[0])
    return lock


def _name_lost_peers(ctx: ParallelContext, step: int, exc: Exception) -> None:
    """Turns a failed collective into a PeerLost naming the ranks that no longer answer."""
    if ctx.world_size == 1 or isinstance(exc, MlraMegaError):
        return
    silent = distributed.silent_ranks()
    if silent:
        raise PeerLost(f"rank {ctx.rank}: lost rank(s) {', '.join(map(str, silent))} during step {step + 1} "
                       f"({str(exc).splitlines()[0][:200]}); they died or hang: see their logs under logs/ in the "
                       "run directory. The restart resumes from the last complete checkpoint") from exc


def _run(cfg: RunConfig, ctx: ParallelContext, engine, batches: TrainBatches, data, run_dir: Path, ckpt, sidecar,
         ds_cfg: dict, callbacks: Sequence[Callback], rank_log: RankLog, log: Callable[[str], None]
         ) -> tuple[list[StepMetrics], Path]:
    """The trainer with its callbacks, inside the rank's log."""
    main_log = log if ctx.is_main else lambda s: None
    drill = cfg.faults
    standard: list[Callback] = [Watchdog(drill.watchdog_minutes, rank_log),
                                *([HangDrill(drill.inject_hang_step, drill.inject_hang_rank, drill.inject_hang_s)]
                                  if drill.inject_hang_step is not None else []),
                                StepProfiler(cfg.profile, run_dir, ctx.rank, log),
                                *stability_callbacks(cfg, main_log), ConsoleLogger(),
                                MetricsFile(run_dir / "metrics.jsonl"), RunSummary(run_dir / "summary.json")]
    if cfg.tracking.enabled:
        from mlra_mega.tracking.mlflow import MLflowLogger

        standard.append(MLflowLogger(cfg, run_dir))
    checkpointer = Checkpointer(cfg, run_dir, Path(cfg.data.tokenizer))
    guard = PreemptionGuard(run_dir, checkpointer, cfg.checkpoint.sigterm_save_s, cfg.faults.peer_timeout_s)
    trainer = Trainer(cfg, ctx, engine, batches, data.valid, [*standard, *callbacks, checkpointer, guard],
                      run_dir=run_dir, log=main_log)
    if ckpt is not None:
        trainer.restore(ckpt, sidecar)  # before anything is written: a refused checkpoint changes nothing
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(public_dict(cfg), sort_keys=False))
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_cfg, indent=2) + "\n")
        log(f"[train] run dir {run_dir}; {ctx.world_size} processes = tensor {ctx.tp_size} x data {ctx.dp_size}, "
            f"ZeRO-{cfg.zero.stage}, {cfg.train.precision}"
            + (f"; resuming {ckpt.path} at step {sidecar['step']}" if ckpt else ""))
        if ckpt is not None:
            _record_config_changes(cfg, sidecar, run_dir, log)
        (run_dir / PREEMPTED).unlink(missing_ok=True)  # this job goes on from where that one stopped
    previous = install_handlers()
    try:
        history = trainer.fit()
    except Exception as exc:
        _name_lost_peers(ctx, trainer.step, exc)
        raise
    finally:
        restore_handlers(previous)
    if trainer.preempted is not None and ctx.is_main:
        log(f"[train] {trainer.preempted}; {run_dir / PREEMPTED} written")
    return history, run_dir


def train(cfg: RunConfig, callbacks: Sequence[Callback] = (), log: Callable[[str], None] = print
          ) -> tuple[list[StepMetrics], Path]:
    """Runs `cfg` to `train.steps`; returns the per-step metrics and the run directory."""
    from megatron.core import parallel_state

    from mlra_mega.model.build import build_model
    from mlra_mega.train.engine import add_sequence_parallel_grad_hooks, build_engine

    dp = validate_layout(cfg, launch_env().world_size if not dist.is_initialized() else dist.get_world_size())
    cfg, tokenizer = _with_tokenizer_vocab(cfg)
    if cfg.tracking.enabled:
        from mlra_mega.tracking.mlflow import check_tracking_store, tracking_uri

        check_tracking_store(tracking_uri(cfg))
    owns_process_group = not dist.is_initialized()
    ctx = distributed.setup(cfg.parallel, cfg.train.seed)
    try:
        seed = cfg.data.seed if cfg.data.seed is not None else cfg.train.seed
        data = build_datasets(cfg.data, cfg.model.seq_length, tokenizer, seed)
        batches = TrainBatches(data.train, SampleOrder(len(data.train), seed),
                               global_batch_size=cfg.train.global_batch_size,
                               micro_batch_size=cfg.train.micro_batch_size, dp_rank=ctx.dp_rank, dp_size=dp)
        model = build_model(cfg.model, tensor_parallel=ctx.tp_size, sequence_parallel=cfg.parallel.sequence_parallel,
                            bf16=cfg.train.precision == "bf16",
                            activation_checkpointing=cfg.train.activation_checkpointing)
        if cfg.parallel.sequence_parallel:
            add_sequence_parallel_grad_hooks(model, parallel_state.get_tensor_model_parallel_group())
        engine, ds_cfg = build_engine(cfg, model.to(ctx.device), dp)
        run_dir = resolve_run_dir(cfg, ctx)
        lock = _lock_run_dir(cfg, ctx, run_dir, log)
        try:
            ckpt, sidecar = _checkpoint_to_resume(cfg, run_dir, ctx.tp_size, dp,
                                                  log if ctx.is_main else lambda s: None)
            with RankLog(run_dir, ctx.rank, launch_env().launcher) as rank_log:
                return _run(cfg, ctx, engine, batches, data, run_dir, ckpt, sidecar, ds_cfg, callbacks, rank_log,
                            log)
        finally:
            if lock is not None:
                lock.release()
    finally:
        distributed.teardown(keep_process_group=not owns_process_group)
