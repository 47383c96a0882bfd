"""One optimizer step over one global batch: the math of a step, apart from the trainer's bookkeeping.

`TrainStep` is the one thing that knows how a step is made, and the one thing a pipelined step
replaces. For each step, in this order:

1. `begin`: the non-finite sums are cleared; the NaN drill decides whether this step is poisoned.
2. For every micro-batch of this rank: forward, the loss (mean over the unmasked tokens),
   `engine.backward`; as each parameter's gradient is computed its hooks run (below).
   At ZeRO-2/3 with `zero.coalesce_reduction` on (by default: under sequence parallelism) the
   micro-batches run inside DeepSpeed's `engine.coalesce_grad_reduction()`: gradients accumulate
   whole on each rank and DeepSpeed reduces them over data parallelism once, when the window
   closes after the last backward (off, ZeRO-2/3 reduce in every micro-batch's backward).
3. After the last backward, before the last `engine.step()` (where DeepSpeed applies the update):
   the "step" watch (below) on the accumulated gradients, before anything reduces them across
   ranks; where they can wait (fp32 at ZeRO 0-1, a coalesced window at ZeRO-2/3), the sequence-parallel
   gradients, accumulated over the micro-batches, in one flattened all-reduce over the
   tensor-parallel group, and then DeepSpeed's own reduction over data parallelism (which the
   step, not `engine.backward`, starts at ZeRO 0-1 wherever the watch or the partial sums must
   come first, and the window's end at ZeRO-2/3); at ZeRO-2/3 in a window, then the micro-batches' earlier
   `engine.step()` calls (counters only: DeepSpeed refuses them inside the window); the
   gradient norm at ZeRO-0 (DeepSpeed keeps none there; the gradients are reduced by now),
   one all-reduce of a world-sized flag vector that tells every rank whether, and on which ranks,
   something was non-finite (if so, the update is dropped on every rank), then the caller's
   `before_optimizer()` (the callbacks' `on_before_optimizer_step`).
4. `engine.step()` per micro-batch; DeepSpeed accumulates and steps at the boundary.
5. After it: whether the step was skipped (by us, or by DeepSpeed's own overflow check, after
   which the schedule is advanced here so the learning rate stays a function of the step), the
   loss's data-parallel mean and the pre-clip gradient norm.

Hooks, all registered here, once, when the step object is made:

- one tensor hook per trainable parameter, which runs, in order:
  a. for parameters marked `sequence_parallel` (norms, row-parallel biases), whose gradients are
     partial sums over each TP rank's slice of the sequence: nothing where the step reduces them
     all at once (below); else (ZeRO-2/3 without a coalesced window, which reduce each gradient
     over data parallelism inside DeepSpeed's own hooks as it is produced; bf16 at ZeRO-0, whose
     optimizer moves each micro-batch's gradients to its own buffer; a gradient observer, which
     must see whole gradients) their all-reduce over the tensor-parallel group, each on its own;
  b. the NaN drill's poison (the first parameter, the drill's rank, the drill's steps);
  c. the non-finite watch, where it must see each fresh gradient ("hooks": ZeRO-2/3, whose hooks
     reduce it over data parallelism in the backward, and bf16 at ZeRO-0): its sum is kept (a NaN
     or inf anywhere makes it non-finite);
  d. the gradient observers (`add_grad_observer`, e.g. the gradient-variance diagnostic, which
     needs every micro-batch's own gradient);
- one pre-hook on the client optimizer that drops every gradient on a step found non-finite;
  torch's AdamW leaves a parameter without a gradient untouched, so parameters and optimizer
  state stay bit-for-bit as they were, while DeepSpeed's counters and the schedule advance as usual.

Tensor hooks run before DeepSpeed's gradient accumulation hooks whatever the registration order,
so registering them after `deepspeed.initialize` is safe.

The non-finite watch reads each rank's own gradients as cheaply as the layout allows (`watch`):
a sum per fresh gradient per micro-batch only where DeepSpeed reduces or moves gradients inside
the backward ("hooks"); a sum per accumulated gradient once per step where the step starts the
reduction ("step", ZeRO 0-1); nothing at all on one process in fp32 ("norm"), where the gradient
norm the step computes anyway is that rank's own: a NaN or inf in any gradient makes it
non-finite, DeepSpeed's ZeRO 1-3 then skip the update themselves (at ZeRO-0 the step drops it),
and the log names rank 0. The micro-batch losses are watched everywhere (a scalar each).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mlra_mega.config import coalesced_reduction
from mlra_mega.distributed import ParallelContext
from mlra_mega.train.nonfinite import NanDrill

__all__ = ["GradObserver", "StepOutcome", "TrainStep", "tensor_parallel_grad_norm"]

# (parameter name, parameter, its fresh gradient on this rank, for this micro-batch)
GradObserver = Callable[[str, torch.nn.Parameter, torch.Tensor], None]


@dataclass(frozen=True)
class StepOutcome:
    loss: float  # mean of the micro-batch losses over every data-parallel rank
    lr: float  # the learning rate this step's update used
    grad_norm: float  # pre-clip, over the whole (tensor-parallel) model
    skipped: bool  # the update was not applied (non-finite somewhere, or DeepSpeed's overflow check)
    bad_ranks: tuple[int, ...]  # the ranks that saw non-finite values (empty when DeepSpeed found it)


def tensor_parallel_grad_norm(model: torch.nn.Module, ctx: ParallelContext) -> float:
    """2-norm of all gradients of the TP-sharded model (replicated parameters counted once)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "tensor_model_parallel", False) or ctx.tp_rank == 0:
            total += p.grad.detach().double().pow(2).sum().cpu()
    if ctx.tp_size > 1:
        dist.all_reduce(total, group=ctx.tp_group)
    return float(total.sqrt())


class TrainStep:
    """`step(n, micro_batches, before_optimizer)` makes step n; see the module docstring for the order."""

    def __init__(self, engine: Any, ctx: ParallelContext, *, zero_stage: int, drill: NanDrill | None = None,
                 coalesce_reduction: str = "auto") -> None:
        self.engine, self.ctx, self.zero_stage, self.drill = engine, ctx, zero_stage, drill
        self.coalesce_reduction = coalesce_reduction
        self.model = engine.module
        self._observers: list[GradObserver] = []
        self._sums: list[torch.Tensor] = []
        self._drop = False
        self._poison = False
        self._poison_left = drill.count if drill is not None and drill.rank == ctx.rank else 0
        self.bf16 = bool(getattr(engine, "bfloat16_enabled", lambda: False)())
        self.watch = self._watch()
        self._register_hooks()

    def _watch(self) -> str:
        """Where the non-finite watch reads this rank's gradients (module docstring, c.):
        "norm": one rank in fp32: the step's gradient norm is this rank's own and decides alone
        (DeepSpeed's ZeRO 1-3 skip an update whose norm is not finite; at ZeRO-0 the step's own
        norm comes before the update); "step": once per step, the gradients accumulated in `.grad`,
        before anything reduces them across ranks (ZeRO 0-1, where the step starts DeepSpeed's
        data-parallel reduction); "hooks": every fresh gradient, before DeepSpeed's hooks reduce
        it over data parallelism in the backward (ZeRO-2/3) or move it to the bf16 optimizer's
        buffer (bf16 at ZeRO-0)."""
        if self.ctx.world_size == 1 and not self.bf16:
            return "norm"
        if self.zero_stage == 1 or (self.zero_stage == 0 and not self.bf16):
            return "step"
        return "hooks"

    # -- hooks -------------------------------------------------------------------------------

    def _register_hooks(self) -> None:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._params = [p for _, p in named]
        self._sp_params = [p for _, p in named if self.ctx.tp_size > 1 and getattr(p, "sequence_parallel", False)]
        # ZeRO-2/3's gradients reduced once per step, in DeepSpeed's coalescing window.
        self.window = coalesced_reduction(self.coalesce_reduction, self.zero_stage, bool(self._sp_params))
        self._coalesce(self._can_coalesce())
        for i, (name, p) in enumerate(named):
            reduce = any(p is q for q in self._sp_params)
            poison = i == 0 and self._poison_left > 0
            p.register_hook(self._grad_hook(name, p, reduce, poison))
        self.engine.basic_optimizer.register_step_pre_hook(self._drop_hook)

    def _can_coalesce(self) -> bool:
        """The sequence-parallel gradients can wait for one reduction per step where DeepSpeed
        reduces over data parallelism once per step, from `.grad` (ZeRO 0-1, not bf16's ZeRO-0
        optimizer; ZeRO-2/3 in a coalescing window), and the pipeline's schedule, our loop or the
        window's end starts that reduction."""
        if not self._sp_params:
            return False
        return self.window or (self.zero_stage in (0, 1) and not (self.bf16 and self.zero_stage == 0))

    def _coalesce(self, on: bool) -> None:
        self.coalesce_sp = on
        # DeepSpeed's backward reduces over data parallelism at the step's last micro-batch (ZeRO
        # 0-1); with the partial sums still to be made whole, or the gradients still to be watched,
        # the step starts that reduction itself.
        self.owns_reduction = self.zero_stage in (0, 1) and (on or self.watch == "step")
        if self.zero_stage in (0, 1):
            self.engine.enable_backward_allreduce = not self.owns_reduction

    def reduce_sequence_parallel_grads(self) -> None:
        """The sequence-parallel parameters' accumulated gradients summed over the TP group, in
        one flattened all-reduce."""
        grads = [p.grad for p in self._sp_params if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.ctx.tp_group)
        for g, whole in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(whole)

    def _grad_hook(self, name: str, p: torch.nn.Parameter, reduce: bool, poison: bool):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if reduce and not self.coalesce_sp:  # a.
                grad = grad.contiguous()
                dist.all_reduce(grad, group=self.ctx.tp_group)
            if poison and self._poison:  # b.
                grad = grad * float("nan")
            if self.watch == "hooks":  # c.
                self._sums.append(grad.detach().sum(dtype=torch.float32))
            for observe in self._observers:  # d.
                observe(name, p, grad)
            return grad

        return hook

    def _drop_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._drop:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def add_grad_observer(self, observer: GradObserver) -> None:
        """`observer(name, param, grad)` sees every fresh gradient of this rank (read-only), whole:
        sequence-parallel gradients are then reduced in their hooks, one by one."""
        self._observers.append(observer)
        if self.coalesce_sp:
            self._coalesce(False)

    # -- the step ----------------------------------------------------------------------------

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean per-token loss over the batch's unmasked tokens (training or evaluation)."""
        dev = self.ctx.device
        tokens, labels = batch["tokens"].to(dev, non_blocking=True), batch["labels"].to(dev, non_blocking=True)
        positions = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
        per_token = self.engine(tokens, positions, None, labels=labels)
        mask = batch["loss_mask"].to(dev, non_blocking=True).float()
        return (per_token.float() * mask).sum() / mask.sum()

    def evaluate(self, global_batches: Sequence[Sequence[dict[str, torch.Tensor]]]) -> float:
        """Mean loss over every micro-batch of these global batches and every data-parallel rank."""
        with torch.no_grad():
            losses = [self.loss(b) for micro in global_batches for b in micro]
        return self.dp_mean(losses)

    def dp_mean(self, values: Sequence[torch.Tensor]) -> float:
        """The mean of this rank's values, averaged over the data-parallel ranks (float64)."""
        mean = torch.stack([v.detach().float() for v in values]).mean().to(torch.float64)
        if self.ctx.dp_size > 1:
            dist.all_reduce(mean, group=self.ctx.dp_group)
            mean /= self.ctx.dp_size
        return float(mean)

    def _begin(self, step: int) -> None:
        self._sums.clear()
        if self.drill is not None and self._poison_left > 0:
            started = self._poison_left < self.drill.count
            self._poison = started or step == self.drill.step
            self._poison_left -= self._poison

    def _watch_accumulated(self) -> None:
        """The "step" watch: one sum per accumulated gradient (a NaN or inf anywhere in any
        micro-batch's gradient stays in the accumulated one), before any reduction across ranks."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            self._sums.append(torch.stack([g.detach().sum(dtype=torch.float32) for g in grads]).sum())

    def _agree(self) -> tuple[int, ...]:
        """One all-reduce: the ranks on which the step is non-finite; if any, the update is dropped."""
        flags = torch.zeros(self.ctx.world_size, dtype=torch.int32, device=self.ctx.device)
        if self._sums:
            flags[self.ctx.rank] = (~torch.isfinite(torch.stack(self._sums).sum())).int()
        if self.ctx.world_size > 1:
            dist.all_reduce(flags)
        self._sums.clear()
        bad = tuple(int(r) for r in torch.nonzero(flags).flatten())
        self._drop = bool(bad)
        return bad

    def __call__(self, step: int, micro_batches: Sequence[dict[str, torch.Tensor]],
                 before_optimizer: Callable[[], None]) -> StepOutcome:
        engine = self.engine
        lr = float(engine.get_lr()[0])
        self._begin(step)
        losses, own_norm = [], None
        last = len(micro_batches) - 1
        with engine.coalesce_grad_reduction() if self.window else contextlib.nullcontext():
            for i, batch in enumerate(micro_batches):
                loss = self.loss(batch)
                self._sums.append(loss.detach().float().sum())
                engine.backward(loss)
                losses.append(loss)
                if i < last and not self.window:
                    engine.step()
            if self.watch == "step":
                self._watch_accumulated()
            if self.coalesce_sp:
                self.reduce_sequence_parallel_grads()
            if self.owns_reduction:
                engine.allreduce_gradients()
        for _ in range(last if self.window else 0):
            engine.step()  # not a boundary: DeepSpeed counts the micro-batch, the reduction is done
        if self.zero_stage == 0:
            own_norm = tensor_parallel_grad_norm(self.model, self.ctx)
            if self.watch == "norm":
                self._sums.append(torch.tensor(own_norm))
        bad = self._agree()
        before_optimizer()
        engine.step()
        applied = engine.was_step_applied()
        if not applied and engine.lr_scheduler is not None:
            engine.lr_scheduler.step()  # DeepSpeed's overflow path does not advance the schedule
        skipped = self._drop or not applied
        if self.watch == "norm" and not applied:
            bad = (self.ctx.rank,)  # fp32: DeepSpeed skips only a step whose norm is not finite
        self._drop = self._poison = False
        norm = engine.get_global_grad_norm()
        if norm is None:
            if own_norm is None:
                raise RuntimeError("no gradient norm: neither DeepSpeed nor the step computed one")
            norm = own_norm
        return StepOutcome(loss=self.dp_mean(losses), lr=lr, grad_norm=float(norm), skipped=skipped, bad_ranks=bad)
