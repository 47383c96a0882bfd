"""DeepSpeed as the one engine for data parallelism, the optimizer and its ZeRO sharding.

The megatron-core model is handed to `deepspeed.initialize` with the parallel context's process
groups as `mpu`, so ZeRO shards over the data-parallel group only and gradient norms are taken over the
whole tensor-parallel model. The optimizer is torch's AdamW (no JIT-built DeepSpeed op), in two
parameter groups (no weight decay on biases and norm weights), with a warm-up + decay schedule.

The schedule is a function of the config and the step (`lr_factor`, `apply_schedule`), so a
resumed run follows its own config whatever the checkpoint's was. What a step adds on top of the
engine (sequence-parallel gradient reduction, the norm at ZeRO-0, non-finite skips) is in
`train/step.py`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from mlra_mega.config import ConfigError, OptimConfig, TrainConfig, ZeroConfig
from mlra_mega.distributed import DeepSpeedMPU, ParallelContext
from mlra_mega.train.checkpoint_io import CheckpointFiles

__all__ = ["deepspeed_config", "param_groups", "lr_factor", "apply_schedule", "build_engine", "release_engine"]


def deepspeed_config(train: TrainConfig, optim: OptimConfig, zero: ZeroConfig, dp_size: int,
                     pipeline: bool = False) -> dict[str, Any]:
    """The effective DeepSpeed config: `zero.template` (if any) with our fields on top. With
    `pipeline` the schedule owns the micro-batch loop: DeepSpeed sees one micro-batch of all of a
    rank's samples per step and no accumulation."""
    base: dict[str, Any] = {}
    if zero.template:
        path = Path(zero.template)
        if not path.is_file():
            raise ConfigError("zero.template", f"{path} not found", "give the path of a DeepSpeed JSON template")
        try:
            base = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError("zero.template", f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})",
                              "fix the JSON") from None
    t = train
    ds = copy.deepcopy(base)
    ds["train_batch_size"] = t.global_batch_size
    accumulation = t.global_batch_size // (t.micro_batch_size * dp_size)
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size * (accumulation if pipeline else 1)
    ds["gradient_accumulation_steps"] = 1 if pipeline else accumulation
    ds["gradient_clipping"] = optim.clip_grad
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": zero.stage,
                               "overlap_comm": zero.overlap_comm, "reduce_bucket_size": zero.reduce_bucket_size,
                               "allgather_bucket_size": zero.allgather_bucket_size}
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    ds["zero_allow_untested_optimizer"] = True  # torch's AdamW: no JIT-built DeepSpeed optimizer
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (GPT-2 practice): biases and norm weights are exempt."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(completed: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of optim.lr for the optimizer step made after `completed` steps (LambdaLR's
    index: 0 for the first step, whose warm-up factor is 1 / warmup_steps)."""
    if optim.warmup_steps and completed < optim.warmup_steps:
        return (completed + 1) / optim.warmup_steps
    floor = optim.min_lr_ratio if optim.min_lr_ratio is not None else optim.min_lr / optim.lr
    progress = min(1.0, (completed - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    if optim.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if optim.schedule == "linear":
        return 1 - (1 - floor) * progress
    return 1.0


def apply_schedule(engine: Any, optim: OptimConfig, total_steps: int, step: int) -> None:
    """The optimizer's hyperparameters and the schedule's position as this config says at `step`
    completed steps. A checkpoint restores the saved run's (its lr, betas, eps, weight decay and
    the scheduler's base rates), so a resumed run whose config changed would follow neither
    schedule; with an unchanged config this sets the very values the checkpoint held."""
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    factor = lr_factor(step, optim, total_steps)
    for i, group in enumerate(groups):
        group["initial_lr"] = optim.lr
        group["lr"] = optim.lr * factor  # LambdaLR's own product: bit-for-bit the saved value
        group["betas"] = tuple(optim.betas)
        group["eps"] = optim.eps
        if i == 0:  # param_groups(): the decayed matrices first, then the exempt ones
            group["weight_decay"] = optim.weight_decay
    scheduler.base_lrs = [optim.lr] * len(groups)
    scheduler.last_epoch = step
    scheduler._last_lr = [g["lr"] for g in groups]


def build_engine(model: torch.nn.Module, ctx: ParallelContext, train: TrainConfig, optim: OptimConfig,
                 zero: ZeroConfig):
    """(DeepSpeed engine, effective DeepSpeed config) for the model and this run's settings."""
    import deepspeed  # seconds to import: not for the commands that never build an engine

    ds_cfg = deepspeed_config(train, optim, zero, ctx.dp_size, pipeline=ctx.pp_size > 1)
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                            betas=optim.betas, eps=optim.eps, fused=optim.fused or None)
    total = train.steps

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim, total))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=scheduler, config=ds_cfg,
                                           mpu=DeepSpeedMPU(ctx), dist_init_required=False)
    engine.checkpoint_engine = CheckpointFiles()  # weights-only reads, recorded (and async) writes
    return engine, ds_cfg


def release_engine(engine: Any) -> None:
    """Lets an engine and everything it holds (the process groups and their gloo threads) be
    freed. DeepSpeed's hooks keep the engine in cycles that run through C++, which Python's gc
    cannot see: `destroy()` removes them. ZeRO-3 also keeps modules in two module-level places:
    its forward stack (after a forward without backward, an evaluation) and a class-wide
    lru_cache of which parameters to release per submodule; both are emptied."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    engine.destroy()
    ours = {id(m) for m in engine.module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in ours]
    cached = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    # Under DeepSpeed's nvtx wrapper (a closure, no __wrapped__) sits the lru_cache.
    for cell in getattr(cached, "__closure__", None) or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()  # only a cost for another engine here: computed again
