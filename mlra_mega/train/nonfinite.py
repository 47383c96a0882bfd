"""Non-finite steps: counted, and rolled back if they persist; the NaN drill that makes them.

The step (`train/step.py`) detects a NaN or inf on any rank and skips the update on all of them;
what is decided from those skips is here. A skipped step leaves parameters and optimizer state
bit-for-bit as they were, while the learning-rate schedule advances as usual.

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

from mlra_mega.config import ConfigError, FaultsConfig

__all__ = ["NanDrill", "NonFiniteCounter", "drill_from"]

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


class NonFiniteCounter:
    """The trainer's count of skipped steps and the rollback decision (the skip itself is made in
    `train/step.py`). Its counts are part of the trainer's state, so they survive a resume."""

    def __init__(self, max_consecutive_skips: int = 0) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_total = 0
        self.consecutive = 0
        self.rollbacks = 0
        self.streak_start = 0  # the first step of the current run of skipped steps
        self.rolled_back_to: str | None = None  # the checkpoint of the last rollback, until a step is applied

    def record(self, step: int, skipped: bool) -> None:
        if skipped:
            self.skipped_total += 1
            self.consecutive += 1
            if self.consecutive == 1:
                self.streak_start = step
        else:
            self.consecutive = 0
            self.rolled_back_to = None

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
