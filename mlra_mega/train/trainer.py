"""The training loop: one global batch per step through the DeepSpeed engine, metrics out.

Each step runs this rank's micro-batches (DeepSpeed accumulates and steps at the boundary),
then records loss (averaged over data parallelism), learning rate, the pre-clip gradient norm,
TEV every `metrics.tev_interval` steps, and throughput. Everything else hangs off callbacks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mlra_mega.config import RunConfig
from mlra_mega.data.datasets import SampleOrder, TrainBatches
from mlra_mega.distributed import ParallelContext
from mlra_mega.metrics.tev import embedding_tev
from mlra_mega.metrics.throughput import throughput
from mlra_mega.model.build import flops_per_token
from mlra_mega.errors import MlraMegaError
from mlra_mega.train.callbacks import Callback
from mlra_mega.train.checkpoint import find_checkpoint, load_checkpoint, read_sidecar
from mlra_mega.train.engine import apply_schedule, global_grad_norm, tensor_parallel_grad_norm
from mlra_mega.train.nonfinite import NonFiniteGuard, drill_from
from mlra_mega.train.signals import Preempted

__all__ = ["StepMetrics", "Trainer"]


@dataclass(frozen=True)
class StepMetrics:
    step: int
    loss: float
    lr: float
    grad_norm: float
    consumed_samples: int
    step_time_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float | None = None
    tev_mean: float | None = None
    tev_std: float | None = None
    skipped_steps: int = 0  # non-finite steps skipped so far in this run
    skipped: int | None = None  # 1 on a step that was skipped
    # Diagnostics callbacks (placed before the writers) add their values here in on_step_end.
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        out.update(self.extra)
        return out


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: ParallelContext, engine: Any, train_batches: TrainBatches,
                 valid_dataset: Any | None = None, callbacks: Sequence[Callback] = (),
                 run_dir: Path | None = None, log: Callable[[str], None] = print) -> None:
        from megatron.core import parallel_state

        self.cfg, self.ctx, self.engine, self.batches = cfg, ctx, engine, train_batches
        self.model = engine.module
        self.valid_dataset = valid_dataset
        self.run_dir, self.log = run_dir, log
        self.nonfinite = NonFiniteGuard(self.model, engine.basic_optimizer, ctx.rank, ctx.world_size, ctx.device,
                                        cfg.train.max_consecutive_skips, drill_from(cfg.faults))
        self.callbacks = [self.nonfinite, *callbacks]
        self.step = 0
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.flops_per_token = flops_per_token(cfg.model)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = self.ctx.device
        tokens, labels = batch["tokens"].to(dev), batch["labels"].to(dev)
        positions = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
        per_token = self.engine(tokens, positions, None, labels=labels)
        mask = batch["loss_mask"].to(dev).float()
        return (per_token.float() * mask).sum() / mask.sum()

    def _dp_mean(self, values: list[torch.Tensor]) -> float:
        mean = torch.stack([v.detach().float() for v in values]).mean().to(torch.float64)
        if self.ctx.dp_size > 1:
            dist.all_reduce(mean, group=self.dp_group)
            mean /= self.ctx.dp_size
        return float(mean)

    def train_step(self) -> StepMetrics:
        start = time.perf_counter()
        lr = float(self.engine.get_lr()[0])
        micro = self.batches.next_global_batch()
        losses, own_norm = [], None
        self.nonfinite.begin_step(self.step + 1)
        for i, batch in enumerate(micro):
            loss = self._loss(batch)
            self.nonfinite.watch_loss(loss)
            self.engine.backward(loss)
            if i == len(micro) - 1:
                if self.cfg.zero.stage == 0:
                    # DeepSpeed keeps no norm at ZeRO-0; the gradients are DP-reduced by now.
                    own_norm = tensor_parallel_grad_norm(self.model, self.tp_group)
                self.nonfinite.agree()
                for cb in self.callbacks:
                    cb.on_before_optimizer_step(self)
            self.engine.step()
            losses.append(loss)
        skipped = self.nonfinite.end_step(self.engine, self.step + 1)
        self.step += 1
        if skipped and self.ctx.is_main:
            ranks = self.nonfinite.last_bad_ranks
            self.log(f"[train] step {self.step}: non-finite loss or gradient on rank(s) "
                     f"{', '.join(map(str, ranks)) if ranks else '? (found by DeepSpeed)'}; update skipped on all ranks "
                     f"({self.nonfinite.consecutive} in a row, {self.nonfinite.skipped_total} in this run)")
        tev = None
        if self.cfg.metrics.tev_interval and self.step % self.cfg.metrics.tev_interval == 0:
            tev = embedding_tev(self.model, self.cfg.model.vocab_size, self.tp_group)
        loss_value = self._dp_mean(losses)
        elapsed = time.perf_counter() - start
        tp = throughput(self.tokens_per_step, elapsed, self.flops_per_token, self.ctx.world_size,
                        self.cfg.metrics.peak_tflops)
        return StepMetrics(step=self.step, loss=loss_value, lr=lr, grad_norm=global_grad_norm(self.engine, own_norm),
                           consumed_samples=self.batches.consumed_samples, step_time_s=elapsed,
                           tokens_per_s=tp.tokens_per_s, tflops_per_device=tp.tflops_per_device, mfu=tp.mfu,
                           tev_mean=tev.mean if tev else None, tev_std=tev.std if tev else None,
                           skipped_steps=self.nonfinite.skipped_total, skipped=1 if skipped else None)

    def restore(self, checkpoint: Any, sidecar: dict[str, Any], keep: Sequence[Callback] = ()) -> None:
        """Engine state, RNG, step, data position and callback states (but `keep`'s) from a checkpoint."""
        load_checkpoint(self.engine, checkpoint)
        self.step = int(sidecar["step"])
        # The schedule is a function of this config and the step, whatever the checkpoint's was.
        apply_schedule(self.engine, self.cfg.optim, self.cfg.train.steps, self.step)
        self.batches.load_state_dict({"consumed_samples": int(sidecar["consumed_samples"])})
        for cb in self.callbacks:
            state = sidecar["callbacks"].get(type(cb).__name__)
            if state and cb not in keep:
                cb.load_state_dict(state)

    def roll_back(self) -> None:
        """Back to the newest complete checkpoint after persistent non-finite steps; the data
        position stays where it is, so the batches since then are not seen again."""
        bad = self.step
        found = None
        if self.run_dir is not None:
            found = find_checkpoint(self.run_dir, verify_hashes=True, log=self.log if self.ctx.is_main else None,
                                    before=self.nonfinite.streak_start)
        if found is None:
            raise MlraMegaError(f"{self.nonfinite.consecutive} non-finite steps in a row up to step {bad} "
                                "(train.max_consecutive_skips) and no checkpoint to roll back to; set "
                                "checkpoint.interval so there is one, or lower optim.lr")
        if found.tag == self.nonfinite.rolled_back_to:
            raise MlraMegaError(f"the run went non-finite again right after rolling back to {found.path}; "
                                "lower optim.lr or look at the data after "
                                f"{self.batches.consumed_samples} samples")
        sidecar = read_sidecar(found)
        consumed = self.batches.consumed_samples
        self.restore(found, sidecar, keep=[self.nonfinite])
        self.batches.load_state_dict({"consumed_samples": consumed})
        self.nonfinite.rolled_back(found.tag)
        if self.ctx.is_main:
            self.log(f"[train] rolled back from step {bad} to {found.path} (step {self.step}), rollback "
                     f"{self.nonfinite.rollbacks}; the data position stays at {consumed} samples")
        for cb in self.callbacks:
            cb.on_rollback(self, bad)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the first `eval.iters` global batches of the validation split (0: every
        whole global batch of it, each sample once; a remainder smaller than a batch is left out)."""
        t = self.cfg.train
        iters = self.cfg.eval.iters or max(1, len(self.valid_dataset) // t.global_batch_size)
        batches = TrainBatches(self.valid_dataset, SampleOrder(len(self.valid_dataset), 0),
                               global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                               dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size)
        self.engine.eval()
        try:
            losses = [self._loss(b) for _ in range(iters) for b in batches.next_global_batch()]
        finally:
            self.engine.train()
        loss = self._dp_mean(losses)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def fit(self) -> list[StepMetrics]:
        """Steps to `train.stop_at` or `train.steps`, or until a preemption stops the run."""
        history = []
        self.preempted: Preempted | None = None
        for cb in self.callbacks:
            cb.on_fit_start(self)
        end = self.cfg.train.stop_at or self.cfg.train.steps
        try:
            while self.step < end:
                metrics = self.train_step()
                history.append(metrics)
                for cb in self.callbacks:
                    cb.on_step_end(self, metrics)
                if self.nonfinite.rollback_due:
                    self.roll_back()
                    history = [m for m in history if m.step <= self.step]
                    continue
                ev = self.cfg.eval
                if self.valid_dataset is not None and ev.interval and (self.step % ev.interval == 0
                                                                       or self.step == end):
                    result = self.evaluate()
                    for cb in self.callbacks:
                        cb.on_eval_end(self, self.step, result)
        except Preempted as stop:
            self.preempted = stop
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return history
