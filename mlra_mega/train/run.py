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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from mlra_mega import distributed
from mlra_mega.config import ConfigError, RunConfig, to_dict
from mlra_mega.data.datasets import SampleOrder, TrainBatches, build_datasets
from mlra_mega.data.tokenizer import check_vocab, load_tokenizer
from mlra_mega.distributed import ParallelContext, launch_env
from mlra_mega.train.callbacks import Callback, ConsoleLogger, MetricsFile
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
    return dp


def resolve_run_dir(cfg: RunConfig, ctx: ParallelContext) -> Path:
    """`run.dir`, or `<run.root>/<experiment>/<run.name or rank 0's timestamp>`."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    name = [cfg.run.name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")]
    if ctx.world_size > 1:
        dist.broadcast_object_list(name, src=0)  # one name for the whole job
    return Path(cfg.run.root) / cfg.tracking.experiment / name[0]


def _with_tokenizer_vocab(cfg: RunConfig):
    if cfg.data.tokenizer is None:
        raise ConfigError("data.tokenizer", "is not set", "give the tokenizer directory that made data.paths")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = check_vocab(cfg.model.vocab_size, tokenizer)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    cfg.validate()
    return cfg, tokenizer


def train(cfg: RunConfig, callbacks: Sequence[Callback] = (), log: Callable[[str], None] = print
          ) -> tuple[list[StepMetrics], Path]:
    """Runs `cfg` to `train.steps`; returns the per-step metrics and the run directory."""
    from megatron.core import parallel_state

    from mlra_mega.model.build import build_model
    from mlra_mega.train.engine import add_sequence_parallel_grad_hooks, build_engine

    dp = validate_layout(cfg, launch_env().world_size if not dist.is_initialized() else dist.get_world_size())
    cfg, tokenizer = _with_tokenizer_vocab(cfg)
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
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            (run_dir / "deepspeed.json").write_text(json.dumps(ds_cfg, indent=2) + "\n")
            log(f"[train] run dir {run_dir}; {ctx.world_size} processes = tensor {ctx.tp_size} x data {ctx.dp_size}, "
                f"ZeRO-{cfg.zero.stage}, {cfg.train.precision}")
        trainer = Trainer(cfg, ctx, engine, batches, data.valid,
                          [ConsoleLogger(), MetricsFile(run_dir / "metrics.jsonl"), *callbacks])
        history = trainer.fit()
        return history, run_dir
    finally:
        distributed.teardown(keep_process_group=not owns_process_group)
