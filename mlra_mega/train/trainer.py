"""The training loop's bookkeeping: the step counter, callbacks in priority order, one metrics path.

One iteration of `fit`:

1. `step` moves first: it is the number of the step being made (and, after it, the last made);
   every callback's `on_step_start`.
2. The step itself (`TrainStep`): micro-batches, backward, the non-finite skip, the optimizer;
   the callbacks' `on_before_optimizer_step` runs inside it, after the last backward.
3. The trainer records the step's metrics (loss, learning rate, gradient norm, TEV every
   `metrics.tev_interval` steps, throughput, skips) and counts a skipped step.
4. Every callback's `on_step_end`, by priority: diagnostics `record_metric`, the checkpointer
   saves, a signal makes the preemption guard save and `request_stop`.
5. Every callback's `on_metrics` with the complete metrics, once: metrics.jsonl, MLflow, the
   console and the summary all get the same values, a user callback's included.
6. A rollback if the non-finite steps persisted; else the evaluation when it is due.

The loop ends at `train.stop_at` or `train.steps`, or after the step in which a stop was requested.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


from mlra_mega.config import EvalConfig, MetricsConfig, ModelConfig, OptimConfig, TrainConfig
from mlra_mega.data.datasets import SampleOrder, TrainBatches
from mlra_mega.data.loader import PrefetchedBatches
from mlra_mega.distributed import ParallelContext, from_stage
from mlra_mega.errors import MlraMegaError
from mlra_mega.metrics.names import sectioned
from mlra_mega.metrics.tev import embedding_tev
from mlra_mega.metrics.throughput import throughput
from mlra_mega.model.build import flops_per_token
from mlra_mega.train.callbacks import Callback, sort_callbacks
from mlra_mega.train.checkpoint import Checkpoint, Checkpointer
from mlra_mega.train.engine import apply_schedule
from mlra_mega.train.nonfinite import NanDrill, NonFiniteCounter
from mlra_mega.train.pipeline_step import PipelineStep
from mlra_mega.train.step import TrainStep

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
    data_wait_s: float = 0.0  # what the step waited for its batches
    mfu: float | None = None
    tev_mean: float | None = None
    tev_std: float | None = None
    skipped_steps: int = 0  # non-finite steps skipped so far in this run
    skipped: int | None = None  # 1 on a step that was skipped
    # What the callbacks recorded in this step (`Trainer.record_metric`), filled once they all ran.
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The step's record under the names metrics.jsonl and MLflow use (`metrics.names`)."""
        out = {sectioned(k): v for k, v in asdict(self).items() if v is not None and k != "extra"}
        out.update(self.extra)
        return out


class Trainer:
    def __init__(self, ctx: ParallelContext, engine: Any, train_batches: TrainBatches | PrefetchedBatches, *, train: TrainConfig,
                 optim: OptimConfig, model: ModelConfig, metrics: MetricsConfig, evaluation: EvalConfig,
                 checkpointer: Checkpointer | None = None, valid_dataset: Any | None = None,
                 callbacks: Sequence[Callback] = (), drill: NanDrill | None = None,
                 coalesce_reduction: str = "auto", log: Callable[[str], None] = print) -> None:
        self.ctx, self.engine, self.batches = ctx, engine, train_batches
        self.model = engine.module
        self.train_cfg, self.optim_cfg, self.model_cfg = train, optim, model
        self.metrics_cfg, self.eval_cfg = metrics, evaluation
        self.checkpointer, self.valid_dataset, self.log = checkpointer, valid_dataset, log
        self.callbacks = sort_callbacks([*callbacks, *([checkpointer] if checkpointer is not None else [])])
        names = [cb.state_key for cb in self.callbacks]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"two callbacks share the state name {dup!r}: give one of them another `name`")
        step_class = PipelineStep if ctx.pp_size > 1 else TrainStep
        self.step_object = step_class(engine, ctx, zero_stage=self._zero_stage(engine), drill=drill,
                                      coalesce_reduction=coalesce_reduction)
        self.nonfinite = NonFiniteCounter(train.max_consecutive_skips)
        self.step = 0
        self.total_steps = train.steps
        self.end_step = train.stop_at or train.steps
        self.stop_reason: str | None = None
        self.metrics: dict[str, float] = {}  # what the callbacks recorded in the current step
        self.flops_per_token = flops_per_token(model)
        self.tokens_per_step = train.global_batch_size * model.seq_length
        self.data_wait_s = 0.0

    @staticmethod
    def _zero_stage(engine: Any) -> int:
        return int(engine.zero_optimization_stage())

    # -- the API callbacks use ---------------------------------------------------------------

    def record_metric(self, name: str, value: float) -> None:
        """A metric of the current step; it reaches every writer (metrics.jsonl, MLflow) once."""
        self.metrics[name] = value

    def request_stop(self, reason: str) -> None:
        """The run ends after this step's callbacks and writers (no evaluation after it)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "consumed_samples": self.batches.consumed_samples,
                "nonfinite": self.nonfinite.state_dict(),
                "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks}}

    def load_state_dict(self, state: dict[str, Any], keep: Sequence[Any] = ()) -> None:
        """Step, data position, counts and callback states (but `keep`'s) of a saved trainer."""
        self.step = int(state["step"])
        # The schedule is a function of this config and the step, whatever the checkpoint's was.
        apply_schedule(self.engine, self.optim_cfg, self.total_steps, self.step)
        self.batches.load_state_dict({"consumed_samples": int(state["consumed_samples"])})
        saved = state.get("callbacks", {})
        if self.nonfinite not in keep:
            # Checkpoints before the step object kept the counts as a callback's.
            self.nonfinite.load_state_dict(state.get("nonfinite") or saved.get("NonFiniteGuard") or {})
        for cb in self.callbacks:
            # A checkpoint written before callbacks had stable names keyed them by class name.
            cb_state = saved.get(cb.state_key, saved.get(type(cb).__name__))
            if cb_state and cb not in keep:
                cb.load_state_dict(cb_state)

    # -- the loop ----------------------------------------------------------------------------

    def restore(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """Engine state and RNG (through the checkpointer), then this trainer's state; the sidecar."""
        sidecar = self.checkpointer.load(self.engine, checkpoint)
        self.load_state_dict(sidecar)
        return sidecar

    def _before_optimizer(self) -> None:
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self)

    def train_step(self) -> StepMetrics:
        self.step += 1
        self.metrics = {}
        for cb in self.callbacks:
            cb.on_step_start(self)
        start = time.perf_counter()
        micro = self.batches.next_global_batch()
        self.data_wait_s = time.perf_counter() - start  # what the step waited for its batches
        out = self.step_object(self.step, micro, self._before_optimizer)
        self.nonfinite.record(self.step, out.skipped)
        if out.skipped and self.ctx.is_main:
            ranks = ", ".join(map(str, out.bad_ranks)) if out.bad_ranks else "? (found by DeepSpeed)"
            self.log(f"[train] step {self.step}: non-finite loss or gradient on rank(s) {ranks}; update skipped on "
                     f"all ranks ({self.nonfinite.consecutive} in a row, {self.nonfinite.skipped_total} in this run)")
        tev = None
        if self.metrics_cfg.tev_interval and self.step % self.metrics_cfg.tev_interval == 0:
            tev = self._tev()
        elapsed = time.perf_counter() - start
        tp = throughput(self.tokens_per_step, elapsed, self.flops_per_token, self.ctx.world_size,
                        self.metrics_cfg.peak_tflops)
        return StepMetrics(step=self.step, loss=out.loss, lr=out.lr, grad_norm=out.grad_norm,
                           consumed_samples=self.batches.consumed_samples, step_time_s=elapsed,
                           tokens_per_s=tp.tokens_per_s, tflops_per_device=tp.tflops_per_device, mfu=tp.mfu,
                           data_wait_s=self.data_wait_s,
                           tev_mean=tev[0] if tev else None, tev_std=tev[1] if tev else None,
                           skipped_steps=self.nonfinite.skipped_total, skipped=1 if out.skipped else None)

    def _tev(self) -> tuple[float, float]:
        """(mean, std) of TEV, from the stage holding the input embedding (exact over its TP group)."""
        stats = [0.0, 0.0]
        if self.ctx.first_stage:
            tev = embedding_tev(self.model, self.model_cfg.vocab_size, self.ctx.tp_group)
            stats = [tev.mean, tev.std]
        mean, std = from_stage(stats, self.ctx, last=False)
        return mean, std

    def roll_back(self) -> None:
        """Back to the newest complete checkpoint from before the non-finite steps; the data
        position stays where it is, so the batches since then are not seen again."""
        bad, counter = self.step, self.nonfinite
        if self.checkpointer is None:
            raise MlraMegaError(f"{counter.consecutive} non-finite steps in a row up to step {bad} "
                                "(train.max_consecutive_skips) and no checkpointer to roll back with")
        found = self.checkpointer.rollback_target(counter, bad, self.batches.consumed_samples)
        consumed = self.batches.consumed_samples
        self.load_state_dict(self.checkpointer.load(self.engine, found), keep=[counter])
        self.batches.load_state_dict({"consumed_samples": consumed})
        counter.rolled_back(found.tag)
        if self.ctx.is_main:
            self.log(f"[train] rolled back from step {bad} to {found.path} (step {self.step}), rollback "
                     f"{counter.rollbacks}; the data position stays at {consumed} samples")
        for cb in self.callbacks:
            cb.on_rollback(self, bad)

    def evaluate(self) -> dict[str, float]:
        """Mean loss over the first `eval.iters` global batches of the validation split (0: every
        whole global batch of it, each sample once; a remainder smaller than a batch is left out)."""
        t = self.train_cfg
        iters = self.eval_cfg.iters or max(1, len(self.valid_dataset) // t.global_batch_size)
        batches = TrainBatches(self.valid_dataset, SampleOrder(len(self.valid_dataset), 0),
                               global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                               dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size)
        self.engine.eval()
        try:
            loss = self.step_object.evaluate([batches.next_global_batch() for _ in range(iters)])
        finally:
            self.engine.train()
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}

    def _eval_due(self) -> bool:
        every = self.eval_cfg.interval
        return self.valid_dataset is not None and bool(every) and (self.step % every == 0 or self.step == self.end_step)

    def fit(self) -> list[StepMetrics]:
        """Steps to `train.stop_at` or `train.steps`, or until a callback requests a stop."""
        history: list[StepMetrics] = []
        self.stop_reason = None
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.step < self.end_step and self.stop_reason is None:
            metrics = self.train_step()
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
            metrics.extra.update(self.metrics)
            record = metrics.as_dict()
            for cb in self.callbacks:
                cb.on_metrics(self, metrics.step, record)
            history.append(metrics)
            if self.nonfinite.rollback_due:
                self.roll_back()
                history = [m for m in history if m.step <= self.step]
                continue
            if self.stop_reason is None and self._eval_due():
                result = self.evaluate()
                for cb in self.callbacks:
                    cb.on_eval_end(self, self.step, result)
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return history
