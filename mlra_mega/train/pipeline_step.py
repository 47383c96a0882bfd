"""The training step over pipeline stages: megatron-core's 1F1B schedule, DeepSpeed's ZeRO-1 step.

`PipelineStep` is `TrainStep` with the micro-batch loop replaced; everything else (the hooks,
the non-finite agreement and skip, the drill, the order of a step) is inherited. Per step:

1. `begin`, as in TrainStep.
2. megatron-core's 1F1B schedule (`get_forward_backward_func`) runs every micro-batch of the step
   through this rank's stage: forward, activations sent to the next stage, gradients received
   and backward. The schedule is given the raw GPTModel stage (not the engine) and calls
   `torch.autograd.backward` itself, so the gradients land in `.grad` as the step's mean over
   micro-batches (the schedule divides each micro-batch's loss by their number, as DeepSpeed's
   accumulation does). The tensor hooks run as they do in TrainStep.
3. With tied embeddings the last stage's copy of the word embeddings and the first stage's
   matrix get the sum of their two gradients (one all-reduce over the embedding group), so both
   copies take the same update; the copy is marked `ds_pipe_replicated`, so ZeRO's norm counts
   the matrix once.
4. The sequence-parallel gradients in one all-reduce over TP (as in TrainStep); DeepSpeed
   reduces the gradients over data parallelism (`allreduce_gradients`); the world
   agrees on non-finite values; the callbacks' `before_optimizer()`; `engine.step()`: ZeRO-1's
   norm all-reduces over TP x PP (the engine's model-parallel group), so every stage clips by
   the global norm.
5. The loss exists on the last stage: its micro-batch mean is broadcast to the other stages,
   then averaged over data parallelism as in TrainStep.

DeepSpeed sees one micro-batch of `micro_batch_size x micro-batches per step` and no accumulation
(`deepspeed_config(..., pipeline=True)`): the schedule owns the micro-batch loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mlra_mega.distributed import ParallelContext, from_stage
from mlra_mega.model.pipeline import is_tied_copy
from mlra_mega.train.nonfinite import NanDrill
from mlra_mega.train.step import StepOutcome, TrainStep

__all__ = ["PipelineStep"]


class PipelineStep(TrainStep):
    """`step(n, micro_batches, before_optimizer)` over this rank's pipeline stage."""

    def __init__(self, engine: Any, ctx: ParallelContext, *, zero_stage: int, drill: NanDrill | None = None,
                 coalesce_reduction: str = "auto") -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if zero_stage != 1:
            raise ValueError(f"a pipelined step needs ZeRO-1, not ZeRO-{zero_stage} (RunConfig.validate refuses it)")
        super().__init__(engine, ctx, zero_stage=zero_stage, drill=drill, coalesce_reduction=coalesce_reduction)
        self._schedule = get_forward_backward_func()
        self._losses: list[torch.Tensor] = []
        self._tied = None
        if getattr(self.model, "share_embeddings_and_output_weights", False) and ctx.in_embedding_group:
            self._tied = self.model.shared_embedding_or_output_weight()
            for name, p in self.model.named_parameters():
                if is_tied_copy(self.model, name):
                    p.ds_pipe_replicated = True  # ZeRO's norm: the first stage counts the matrix

    def _watch(self) -> str:
        # The schedule's backward and the tied embeddings' reduction are ours, but the hooks keep
        # the watch in one place for every stage's partial model.
        return "hooks"

    # -- the schedule's callbacks ------------------------------------------------------------

    def _loss_func(self, mask: torch.Tensor, per_token: torch.Tensor):
        loss = (per_token.float() * mask).sum() / mask.sum()
        self._sums.append(loss.detach().float().sum())  # the non-finite watch, on the last stage
        self._losses.append(loss.detach().clone())  # the schedule scales its output in place
        return loss, {"lm loss": self._losses[-1]}

    def _forward_step(self, data_iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        dev = self.ctx.device
        tokens, labels = batch["tokens"].to(dev, non_blocking=True), batch["labels"].to(dev, non_blocking=True)
        positions = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
        output = model(tokens, positions, None, labels=labels)
        return output, functools.partial(self._loss_func, batch["loss_mask"].to(dev, non_blocking=True).float())

    def _run_schedule(self, micro_batches: Sequence[dict[str, torch.Tensor]], forward_only: bool) -> float:
        """Runs the micro-batches through the pipeline; their mean loss (on every stage)."""
        self._losses = []
        b, s = micro_batches[0]["tokens"].shape
        self._schedule(forward_step_func=self._forward_step, data_iterator=iter(micro_batches), model=[self.model],
                       num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b,
                       forward_only=forward_only)
        mean = float(torch.stack(self._losses).double().mean()) if self.ctx.last_stage else 0.0
        return from_stage([mean], self.ctx, last=True)[0]

    # -- the step ----------------------------------------------------------------------------

    def evaluate(self, global_batches: Sequence[Sequence[dict[str, torch.Tensor]]]) -> float:
        with torch.no_grad():
            means = [self._run_schedule(micro, forward_only=True) for micro in global_batches]
        return self.dp_mean([torch.tensor(m) for m in means])

    def __call__(self, step: int, micro_batches: Sequence[dict[str, torch.Tensor]],
                 before_optimizer: Callable[[], None]) -> StepOutcome:
        engine = self.engine
        lr = float(engine.get_lr()[0])
        self._begin(step)
        loss = self._run_schedule(micro_batches, forward_only=False)
        if self._tied is not None and self._tied.grad is not None:
            dist.all_reduce(self._tied.grad, group=self.ctx.embedding_group)
        if self.coalesce_sp:
            self.reduce_sequence_parallel_grads()
        engine.allreduce_gradients()
        bad = self._agree()
        before_optimizer()
        engine.step()
        applied = engine.was_step_applied()
        if not applied and engine.lr_scheduler is not None:
            engine.lr_scheduler.step()
        skipped = self._drop or not applied
        self._drop = self._poison = False
        norm = engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("no gradient norm: DeepSpeed's ZeRO-1 step computed none")
        return StepOutcome(loss=self.dp_mean([torch.tensor(loss)]), lr=lr, grad_norm=float(norm), skipped=skipped,
                           bad_ranks=bad)
