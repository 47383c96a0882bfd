"""DeepSpeed as the one engine for data parallelism, the optimizer and its ZeRO sharding.

The megatron-core model is handed to `deepspeed.initialize` with megatron's process groups as
`mpu`, so ZeRO shards over the data-parallel group only and gradient norms are taken over the
whole tensor-parallel model. The optimizer is torch's AdamW (no JIT-built DeepSpeed op), in two
parameter groups (no weight decay on biases and norm weights), with a warm-up + decay schedule.

What DeepSpeed does not do for a megatron model is done here: with sequence parallelism, the
gradients of parameters marked `sequence_parallel` (norms, row-parallel biases) are partial sums
over each TP rank's slice of the sequence, and are all-reduced over the TP group as they are
produced (before DeepSpeed reduces them over data parallelism); at ZeRO-0 in fp32 DeepSpeed keeps
no gradient norm, so it is computed here, tensor-parallel aware.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mlra_mega.config import ConfigError, OptimConfig, RunConfig
from mlra_mega.train.safe_load import make_engine_loads_safe

__all__ = ["MegatronMPU", "deepspeed_config", "param_groups", "lr_factor", "apply_schedule", "build_engine",
           "add_sequence_parallel_grad_hooks", "tensor_parallel_grad_norm", "global_grad_norm"]


class MegatronMPU:
    """megatron-core's parallel state in the shape DeepSpeed's `mpu` argument expects."""

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict[str, Any]:
    """The effective DeepSpeed config: `zero.template` (if any) with our fields on top."""
    base: dict[str, Any] = {}
    if cfg.zero.template:
        path = Path(cfg.zero.template)
        if not path.is_file():
            raise ConfigError("zero.template", f"{path} not found", "give the path of a DeepSpeed JSON template")
        try:
            base = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError("zero.template", f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})",
                              "fix the JSON") from None
    t = cfg.train
    ds = copy.deepcopy(base)
    ds["train_batch_size"] = t.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.global_batch_size // (t.micro_batch_size * dp_size)
    ds["gradient_clipping"] = cfg.optim.clip_grad
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": cfg.zero.stage}
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


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of optim.lr for the optimizer step after `step` completed ones."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr_ratio if optim.min_lr_ratio is not None else optim.min_lr / optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
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


def add_sequence_parallel_grad_hooks(model: torch.nn.Module, tp_group: dist.ProcessGroup) -> int:
    """All-reduce, over TP, the gradient of every `sequence_parallel` parameter as it is made."""
    count = 0
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.requires_grad:
            def reduce(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.contiguous()
                dist.all_reduce(grad, group=tp_group)
                return grad

            p.register_hook(reduce)
            count += 1
    return count


def tensor_parallel_grad_norm(model: torch.nn.Module, tp_group: dist.ProcessGroup | None) -> float:
    """2-norm of all gradients of the TP-sharded model (replicated parameters counted once)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            total += p.grad.detach().double().pow(2).sum().cpu()
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(total, group=tp_group)
    return float(total.sqrt())


def global_grad_norm(engine: Any, precomputed: float | None) -> float:
    """DeepSpeed's pre-clip norm where it keeps one, else the one computed before the step."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        if precomputed is None:
            raise RuntimeError("no gradient norm: neither DeepSpeed nor the trainer computed one")
        return precomputed
    return float(norm)


def build_engine(cfg: RunConfig, model: torch.nn.Module, dp_size: int):
    """(DeepSpeed engine, effective DeepSpeed config) for the model and this run's settings."""
    import deepspeed

    ds_cfg = deepspeed_config(cfg, dp_size)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps, fused=cfg.optim.fused or None)
    total = cfg.train.steps

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim, total))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=scheduler, config=ds_cfg,
                                           mpu=MegatronMPU(), dist_init_required=False)
    make_engine_loads_safe(engine)
    return engine, ds_cfg
