"""Preemption: SIGUSR1 / SIGTERM -> a flag all ranks agree on -> a checkpoint -> a PREEMPTED marker.

The handlers only set a flag. At the next step boundary every rank contributes its flag to
one small all-reduce (MAX), so all ranks stop at the same step even when the signal reached
only some of them. Then a checkpoint is saved (on SIGTERM only if the last save took less than
`checkpoint.sigterm_save_s`, since Slurm kills KillWait seconds after SIGTERM and torchrun's
agent about 30 s after forwarding it), `<run dir>/PREEMPTED` is written by rank 0, and the run
ends normally. The trainer knows nothing of Slurm: a batch script that finds the marker requeues
the job (exit statuses do not survive torchrun), and the requeued job resumes from the
checkpoint. Outside Slurm the same signal saves and exits cleanly. The guard stops the run through
`trainer.request_stop`: the step's metrics are still written, and no evaluation follows.

A rank that holds a signal waits at most `faults.peer_timeout_s` for the others to agree: a
launcher that tears the job down after one rank died signals the survivors, and they must not
start a collective save with a dead peer. They exit at once, naming the ranks that did not answer.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mlra_mega.distributed import silent_ranks, with_hosts
from mlra_mega.files import atomic_write_text
from mlra_mega.train import rank_logs
from mlra_mega.train.callbacks import Callback, Priority

__all__ = ["PREEMPTED", "PreemptionGuard", "install_handlers", "received"]

PREEMPTED = "PREEMPTED"
_SIGNALS = {signal.SIGUSR1: "SIGUSR1", signal.SIGTERM: "SIGTERM"}
_received: dict[str, Any] = {"signal": None, "at": None}


def _handler(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    if _received["signal"] is None or signum == signal.SIGTERM:
        _received["signal"], _received["at"] = _SIGNALS[signum], time.time()


def install_handlers() -> dict[int, Any]:
    """Installs the flag-setting handlers; returns the previous ones (to restore)."""
    _received["signal"] = _received["at"] = None
    return {s: signal.signal(s, _handler) for s in _SIGNALS}


def restore_handlers(previous: dict[int, Any]) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


def received() -> str | None:
    return _received["signal"]


class PreemptionGuard(Callback):
    """After the checkpointer: agrees on a signal, saves, writes the marker, asks the trainer to stop."""

    priority = Priority.PREEMPTION
    name = "preemption"

    def __init__(self, run_dir: Path, checkpointer: Any, sigterm_save_s: float, peer_timeout_s: float = 60.0) -> None:
        self.run_dir, self.checkpointer, self.sigterm_save_s = run_dir, checkpointer, sigterm_save_s
        self.peer_timeout_s = peer_timeout_s

    def _agreed(self, device: torch.device, step: int) -> str | None:
        code = {None: 0, "SIGUSR1": 1, "SIGTERM": 2}[received()]
        flag = torch.tensor([code], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
            if code == 0:
                work.wait()  # no signal here: wait as long as the process group allows
            else:
                # A launcher tearing a job down after one rank died sends SIGTERM to the rest: a
                # collective save with a dead peer would hang, so a signalled rank waits for the
                # others only briefly. The process-group timeout itself stays as it is.
                try:
                    work.wait(timeout=datetime.timedelta(seconds=self.peer_timeout_s))
                except RuntimeError as exc:
                    self._give_up(step, received(), exc)
        return {0: None, 1: "SIGUSR1", 2: "SIGTERM"}[int(flag.item())]

    def _give_up(self, step: int, signal_name: str | None, exc: BaseException) -> None:
        """Leaves without a checkpoint: an in-flight collective with a dead peer cannot be
        cleaned up, so this process exits at once (metrics.jsonl is already on disk)."""
        silent = silent_ranks()
        who = f"rank(s) {with_hosts(silent)} did not answer" if silent else "another rank did not answer"
        print(f"mlra-mega: error: rank {dist.get_rank()}: {signal_name} after step {step}, but {who} within "
              f"faults.peer_timeout_s={self.peer_timeout_s:g}s ({str(exc).splitlines()[0][:200]}); exiting without "
              "a checkpoint: the restart resumes from the last complete one", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if rank_logs.current() is not None:
            rank_logs.current().close()  # os._exit skips every finally: hand the log its last lines now
        os._exit(1)

    def on_step_end(self, trainer: Any, metrics: Any) -> None:
        name = self._agreed(trainer.ctx.device, trainer.step)
        if name is None:
            return
        last = self.checkpointer.last
        saved_here = last is not None and last.tag.endswith(f"{trainer.step:08d}")
        fits = name == "SIGUSR1" or (self.checkpointer.last_save_s or 0.0) <= self.sigterm_save_s
        if not saved_here and fits:
            self.checkpointer.save(trainer)
        saved = saved_here or fits
        if trainer.ctx.is_main:
            marker = {"signal": name, "step": trainer.step, "saved": saved,
                      "checkpoint": str(self.checkpointer.last.path) if saved else None, "time": time.time()}
            atomic_write_text(self.run_dir / PREEMPTED, json.dumps(marker) + "\n")
        trainer.request_stop(f"preempted by {name} after step {trainer.step} ({'saved' if saved else 'not saved'})")
