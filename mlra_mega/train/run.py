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
import gc
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist
import yaml

from mlra_mega import distributed
from mlra_mega.config import ConfigError, RunConfig, check_run_inputs, flatten, migrate_saved, public_dict
from mlra_mega.data.datasets import SampleOrder, TrainBatches, build_datasets
from mlra_mega.data.loader import PrefetchedBatches
from mlra_mega.data.tokenizer import CARD_FILE, MODEL_FILE, check_vocab, load_tokenizer
from mlra_mega.distributed import ParallelContext, launch_env
from mlra_mega.errors import MlraMegaError, PeerLost
from mlra_mega.files import atomic_write_text
from mlra_mega.model.build import build_model, recompute_settings
from mlra_mega.model.hf_import import load_hf_weights
from mlra_mega.tracking.mlflow import MLflowLogger, check_tracking_store, tracking_uri
from mlra_mega.tracking.system_metrics import SystemMetrics
from mlra_mega.train.callbacks import CONFIG_CHANGES, Callback, ConsoleLogger, MetricsFile, RunSummary
from mlra_mega.train.checkpoint import Checkpointer
from mlra_mega.train.comm_metrics import CommMetrics
from mlra_mega.train.peak_memory import PeakMemory
from mlra_mega.train.engine import build_engine, release_engine
from mlra_mega.train.nonfinite import drill_from
from mlra_mega.train.profiler import StepProfiler
from mlra_mega.train.rank_logs import HangDrill, RankLog, Watchdog
from mlra_mega.train.run_lock import RunLock
from mlra_mega.train.signals import PREEMPTED, PreemptionGuard, install_handlers, restore_handlers
from mlra_mega.train.stability import stability_callbacks
from mlra_mega.train.task_eval import TaskEvaluation
from mlra_mega.train.trainer import StepMetrics, Trainer

__all__ = ["validate_layout", "resolve_run_dir", "train"]


def validate_layout(cfg: RunConfig, world_size: int) -> int:
    """The data-parallel size of this layout, or a ConfigError saying what does not fit."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    dp = distributed.check_world(tp, pp, world_size)
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        layout = f"tensor {tp}" if pp == 1 else f"tensor {tp} x pipeline {pp}"
        raise ConfigError("train.global_batch_size",
                          f"{t.global_batch_size} is not divisible by micro_batch_size x data-parallel size "
                          f"= {t.micro_batch_size} x {dp} (world {world_size} / {layout})",
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


_NOT_SETTINGS = ("checkpoint.resume",)  # how this start was asked for, not a setting of the run


def config_changes(saved: dict, cfg: RunConfig) -> dict[str, list]:
    """{key: [checkpoint's value, this run's]} for every setting that differs (both masked)."""
    old, new = flatten(migrate_saved(saved)), flatten(public_dict(cfg))
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
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_id)
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
        raise PeerLost(f"rank {ctx.rank}: lost rank(s) {distributed.with_hosts(silent)} during step {step} "
                       f"({str(exc).splitlines()[0][:200]}); they died or hang: see their logs under logs/ in the "
                       "run directory. The restart resumes from the last complete checkpoint") from exc


def _callbacks(cfg: RunConfig, ctx: ParallelContext, run_dir: Path, rank_log: RankLog, checkpointer: Checkpointer,
               log: Callable[[str], None]) -> list[Callback]:
    """The standard callbacks of a run, each given the config section it uses (the trainer sorts
    them by priority)."""
    main_log = log if ctx.is_main else lambda s: None
    faults = cfg.faults
    out: list[Callback] = [Watchdog(faults.watchdog_minutes, rank_log)]
    if faults.inject_hang_step is not None:
        out.append(HangDrill(faults.inject_hang_step, faults.inject_hang_rank, faults.inject_hang_s))
    if cfg.metrics.comm_interval:
        out.append(CommMetrics(cfg.metrics.comm_interval, ctx))
    if cfg.metrics.memory_interval:
        out.append(PeakMemory(cfg.metrics.memory_interval, ctx))
    out += [StepProfiler(cfg.profile, run_dir, ctx.rank, log),
            *stability_callbacks(cfg.diagnostics, sequence_parallel=cfg.parallel.sequence_parallel,
                                 vocab_size=cfg.model.vocab_size, log=main_log),
            ConsoleLogger(cfg.train.log_interval), MetricsFile(run_dir / "metrics.jsonl"),
            RunSummary(run_dir / "summary.json"),
            PreemptionGuard(run_dir, checkpointer, cfg.checkpoint.sigterm_save_s, faults.peer_timeout_s)]
    if cfg.eval.tasks:
        out.append(TaskEvaluation(cfg.eval, load_tokenizer(cfg.data.tokenizer, cfg.data.eod_id), cfg.model.seq_length,
                                  cfg.model.vocab_size, main_log))
    if cfg.tracking.enabled:
        out.append(MLflowLogger(cfg.tracking, run_dir, params=flatten(public_dict(cfg)), runs_root=cfg.run.root,
                                zero_stage=cfg.zero.stage))
        if cfg.metrics.system_metrics:
            out.append(SystemMetrics(tracking_uri(cfg), run_dir, cfg.metrics.system_metrics_interval_s,
                                     cfg.tracking.final_flush_s))
    return out


def _run(cfg: RunConfig, ctx: ParallelContext, engine, batches: PrefetchedBatches, data, run_dir: Path,
         checkpointer: Checkpointer, ckpt, sidecar, ds_cfg: dict, callbacks: Sequence[Callback], rank_log: RankLog,
         log: Callable[[str], None]) -> tuple[list[StepMetrics], Path]:
    """The trainer with its callbacks, inside the rank's log."""
    trainer = Trainer(ctx, engine, batches, train=cfg.train, optim=cfg.optim, model=cfg.model, metrics=cfg.metrics,
                      evaluation=cfg.eval, checkpointer=checkpointer, valid_dataset=data.valid,
                      callbacks=[*_callbacks(cfg, ctx, run_dir, rank_log, checkpointer, log), *callbacks],
                      drill=drill_from(cfg.faults), coalesce_reduction=cfg.zero.coalesce_reduction,
                      log=log if ctx.is_main else lambda s: None)
    if ckpt is not None:
        trainer.restore(ckpt)  # before anything is written: a refused checkpoint changes nothing
    if ctx.is_main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(public_dict(cfg), sort_keys=False))
        atomic_write_text(run_dir / "deepspeed.json", json.dumps(ds_cfg, indent=2) + "\n")
        stages = f" x pipeline {ctx.pp_size}" if ctx.pp_size > 1 else ""
        log(f"[train] run dir {run_dir}; {ctx.world_size} processes = tensor {ctx.tp_size}{stages} x data {ctx.dp_size}, "
            f"ZeRO-{cfg.zero.stage}, {cfg.train.precision}"
            + (f"; resuming {ckpt.path} at step {sidecar['step']}" if ckpt else ""))
        if ckpt is not None:
            _record_config_changes(cfg, sidecar, run_dir, log)
        if cfg.zero.stage >= 1 and ctx.dp_size == 1 and ctx.pp_size == 1:
            log(f"[train] note: ZeRO-{cfg.zero.stage} over one data-parallel rank shards nothing and costs DeepSpeed's "
                "flat copies (1.2x the step at GPT-2 small width on CPU, docs/performance.md section 11); "
                "zero.stage=0 is faster until the run has several data-parallel ranks")
        (run_dir / PREEMPTED).unlink(missing_ok=True)  # this job goes on from where that one stopped
    previous = install_handlers()
    try:
        history = trainer.fit()
    except Exception as exc:
        _name_lost_peers(ctx, trainer.step, exc)
        raise
    finally:
        restore_handlers(previous)
        batches.close()
    if trainer.stop_reason is not None and ctx.is_main:
        log(f"[train] {trainer.stop_reason}; {run_dir / PREEMPTED} written")
    return history, run_dir


def _tokenizer_dir(tokenizer, run_dir: Path, ctx: ParallelContext) -> Path:
    """The directory checkpoints copy: a tokenizer of ours as it is; one made elsewhere, written
    once with its computed card into the run directory (rank 0 copies it at each save)."""
    own = tokenizer.model_path.parent
    if tokenizer.model_path.name == MODEL_FILE and (own / CARD_FILE).is_file():
        return own
    out = run_dir / "tokenizer"
    if ctx.is_main:
        tokenizer.write_dir(out)
    return out


def train(cfg: RunConfig, callbacks: Sequence[Callback] = (), log: Callable[[str], None] = print
          ) -> tuple[list[StepMetrics], Path]:
    """Runs `cfg` to `train.steps`; returns the per-step metrics and the run directory."""
    try:
        return _train(cfg, callbacks, log)
    finally:
        # The run's objects are unreachable now but partly in cycles: collected here, their
        # process groups' gloo threads end now rather than at some later collection (runs in
        # one process, as a sweep's or the tests', would otherwise pile them up, all polling).
        gc.collect()


def _train(cfg: RunConfig, callbacks: Sequence[Callback], log: Callable[[str], None]
           ) -> tuple[list[StepMetrics], Path]:
    dp = validate_layout(cfg, launch_env().world_size if not dist.is_initialized() else dist.get_world_size())
    check_run_inputs(cfg)
    cfg, tokenizer = _with_tokenizer_vocab(cfg)
    if cfg.tracking.enabled:
        check_tracking_store(tracking_uri(cfg))
    owns_process_group = not dist.is_initialized()
    ctx = distributed.setup(cfg.parallel, cfg.train.seed)
    engine = None
    try:
        seed = cfg.data.seed if cfg.data.seed is not None else cfg.train.seed
        data = build_datasets(cfg.data, cfg.model.seq_length, tokenizer, seed)
        batches = PrefetchedBatches(TrainBatches(data.train, SampleOrder(len(data.train), seed),
                                                 global_batch_size=cfg.train.global_batch_size,
                                                 micro_batch_size=cfg.train.micro_batch_size, dp_rank=ctx.dp_rank,
                                                 dp_size=dp),
                                    num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                                    pin_memory=ctx.device.type == "cuda")
        model = build_model(cfg.model, tensor_parallel=ctx.tp_size, sequence_parallel=cfg.parallel.sequence_parallel,
                            bf16=cfg.train.precision == "bf16",
                            recompute=recompute_settings(cfg.train.recompute, cfg.train.recompute_method,
                                                         cfg.train.recompute_num_layers),
                            pipeline_layers=cfg.parallel.pipeline_layers)
        if cfg.model.init_from is not None:  # before the engine copies the weights into its fp32 partitions
            load_hf_weights(model, cfg.model.init_from, cfg.model, ctx.tp_size, ctx.tp_rank,
                            log=log if ctx.is_main else lambda s: None)
        engine, ds_cfg = build_engine(model.to(ctx.device), ctx, cfg.train, cfg.optim, cfg.zero)
        run_dir = resolve_run_dir(cfg, ctx)
        lock = _lock_run_dir(cfg, ctx, run_dir, log)
        try:
            checkpointer = Checkpointer(cfg.checkpoint, run_dir, ctx, config=public_dict(cfg),
                                        zero_stage=cfg.zero.stage, tokenizer_dir=_tokenizer_dir(tokenizer, run_dir, ctx),
                                        log=log)
            ckpt, sidecar = checkpointer.resume_point(cfg.train.steps)
            with RankLog(run_dir, ctx.rank, launch_env().launcher) as rank_log:
                return _run(cfg, ctx, engine, batches, data, run_dir, checkpointer, ckpt, sidecar, ds_cfg, callbacks,
                            rank_log, log)
        finally:
            if lock is not None:
                lock.release()
    finally:
        if engine is not None:
            release_engine(engine)  # else its hooks keep it, and its process groups, alive
        distributed.teardown(keep_process_group=not owns_process_group)
