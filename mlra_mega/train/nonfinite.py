"""Non-finite steps: detected on any rank, skipped on all, counted, and rolled back if they persist.

Detection is local and cheap: a hook on every parameter adds the sum of each freshly computed
gradient (before DeepSpeed reduces or partitions it, so the same at every ZeRO stage) and each
micro-batch loss to a list; a NaN or inf anywhere makes that sum non-finite. Before the
optimizer step, one all-reduce of a world-sized flag vector tells every rank whether, and on
which ranks, something was non-finite. A skipped step still goes through `engine.step()` (so
DeepSpeed's counters, gradient buffers and the learning-rate schedule advance as usual), but a
pre-hook on the client optimizer drops every gradient it is handed, and torch's AdamW leaves a
parameter without a gradient untouched: parameters and optimizer state stay bit-for-bit as they
were. Where DeepSpeed's own overflow check skipped the step first, the schedule is advanced here so
the learning rate stays a function of the step.

`train.max_consecutive_skips` (0 = off) rolls the run back to its newest complete checkpoint
after that many skipped steps in a row (periodic checkpoints are not written on a skipped
step, and the rollback goes to one from before the first skip), keeping the data position (the batches in between are not
seen again). A drill poisons one rank's gradients at a chosen step (`faults.inject_nan_*` or
MLRA_INJECT_NAN=STEP[:RANK[:COUNT]]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mlra_mega.config import ConfigError, FaultsConfig
from mlra_mega.train.callbacks import Callback

__all__ = ["NanDrill", "NonFiniteGuard", "drill_from"]

ENV_DRILL = "MLRA_INJECT_NAN"


@dataclass(frozen=True)
class NanDrill:
    """Poison `rank`'s gradients on `count` steps in a row from the first time `step` is run
    (once per process: the steps run again after a rollback are not poisoned again)."""

    step: int
    rank: int = 0
    count: int = 1


def drill_from(faults: FaultsConfig, environ: dict[str, str] | None = None) -> NanDrill | None:
    """The drill the environment asks for (it wins), else the config's, else None."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_DRILL, "").strip()
    if text:
        try:
            parts = [int(x) for x in text.split(":")]
            if not 1 <= len(parts) <= 3 or parts[0] < 1 or min(parts) < 0 or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
        except ValueError:
            raise ConfigError(ENV_DRILL, f"cannot read {text!r}",
                              "use STEP, STEP:RANK or STEP:RANK:COUNT with STEP and COUNT >= 1") from None
        return NanDrill(*parts)
    if faults.inject_nan_step is None:
        return None
    return NanDrill(faults.inject_nan_step, faults.inject_nan_rank, faults.inject_nan_count)


class NonFiniteGuard(Callback):
    """Owned by the trainer: `begin_step`, `watch_loss`, `agree` before the last `engine.step()`,
    `end_step` after it. Its counters are its callback state, so they survive a resume."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, world_size: int,
                 device: torch.device, max_consecutive_skips: int = 0, drill: NanDrill | None = None) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.max_consecutive_skips, self.drill = max_consecutive_skips, drill
        self.skipped_total = 0
        self.consecutive = 0
        self.rollbacks = 0
        self.last_bad_ranks: list[int] = []
        self.rolled_back_to: str | None = None
        self.streak_start = 0  # the first step of the current run of skipped steps
        self._sums: list[torch.Tensor] = []
        self._poison = False
        self._poison_left = drill.count if drill is not None and drill.rank == rank else 0
        self._drop = False
        params = [p for p in model.parameters() if p.requires_grad]
        if drill is not None and drill.rank == rank:
            params[0].register_hook(self._poison_hook)  # first, so the watch below sees the poison
        for p in params:
            p.register_hook(self._watch_hook)
        optimizer.register_step_pre_hook(self._drop_hook)

    def _poison_hook(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan") if self._poison else grad

    def _watch_hook(self, grad: torch.Tensor) -> None:
        self._sums.append(grad.detach().sum(dtype=torch.float32))

    def _drop_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._drop:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def begin_step(self, step: int) -> None:
        """Before the first micro-batch of `step`."""
        self._sums.clear()
        started = self._poison_left < self.drill.count if self.drill is not None else False
        self._poison = self._poison_left > 0 and (started or step == self.drill.step)
        self._poison_left -= self._poison

    def watch_loss(self, loss: torch.Tensor) -> None:
        self._sums.append(loss.detach().float().sum())

    def agree(self) -> bool:
        """One all-reduce: is the step non-finite anywhere? If so the coming update is dropped."""
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        if self._sums:
            flags[self.rank] = (~torch.isfinite(torch.stack(self._sums).sum())).int()
        if self.world_size > 1:
            dist.all_reduce(flags)
        self._sums.clear()
        self.last_bad_ranks = [int(r) for r in torch.nonzero(flags).flatten()]
        self._drop = bool(self.last_bad_ranks)
        return self._drop

    def end_step(self, engine: Any, step: int) -> bool:
        """After the step's last `engine.step()`: whether it was skipped (by us or by DeepSpeed)."""
        skipped = self._drop or not engine.was_step_applied()
        if not engine.was_step_applied() and engine.lr_scheduler is not None:
            engine.lr_scheduler.step()  # DeepSpeed's overflow path does not advance the schedule
        self._drop = self._poison = False
        if skipped:
            self.skipped_total += 1
            self.consecutive += 1
            if self.consecutive == 1:
                self.streak_start = step
        else:
            self.consecutive = 0
            self.rolled_back_to = None
        return skipped

    @property
    def rollback_due(self) -> bool:
        return 0 < self.max_consecutive_skips <= self.consecutive

    def rolled_back(self, tag: str) -> None:
        self.rollbacks += 1
        self.consecutive = 0
        self.rolled_back_to = tag

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
