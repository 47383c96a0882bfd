"""The callback interface, and the callbacks that are not tied to a backend.

Everything that is not the training step hangs off the trainer as a callback: logging,
checkpointing, tracking, stability guards, signals. Each callback has its own state
(`state_dict` / `load_state_dict`) so that it survives a resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlra_mega.train.trainer import StepMetrics, Trainer

__all__ = ["CONFIG_CHANGES", "Callback", "ConsoleLogger", "MetricsFile", "RunSummary"]

# In the run directory: one record per resume that changed settings (written by train.run, sent
# to MLflow as a tag and an artifact by the tracker).
CONFIG_CHANGES = "config_changes.jsonl"


class Callback:
    """No-op hooks; override what you need."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_before_optimizer_step(self, trainer: "Trainer") -> None:
        """After the step's last backward, before the optimizer: the reduced gradients exist
        (read them with deepspeed.utils.safe_get_full_grad, a collective under ZeRO)."""

    def on_step_end(self, trainer: "Trainer", metrics: "StepMetrics") -> None: ...

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None: ...

    def on_rollback(self, trainer: "Trainer", from_step: int) -> None:
        """The trainer went back from `from_step` to `trainer.step` (a checkpoint's)."""

    def on_fit_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ConsoleLogger(Callback):
    """One line per `train.log_interval` steps on rank 0: step, loss, TEV, tokens/s, ETA."""

    def __init__(self, print_fn=print) -> None:
        self.print = print_fn
        self._start = time.perf_counter()
        self._start_step = 0

    def on_fit_start(self, trainer: "Trainer") -> None:
        self._start, self._start_step = time.perf_counter(), trainer.step

    def on_step_end(self, trainer: "Trainer", m: "StepMetrics") -> None:
        if not trainer.ctx.is_main:
            return
        t = trainer.cfg.train
        if m.step % t.log_interval and m.step != t.steps:
            return
        done = m.step - self._start_step
        eta = (time.perf_counter() - self._start) / max(done, 1) * (t.steps - m.step)
        tev = f"  tev {m.tev_mean:.5f} +- {m.tev_std:.5f}" if m.tev_mean is not None else ""
        mfu = f"  mfu {m.mfu:.1%}" if m.mfu is not None else ""
        self.print(f"step {m.step:>6}/{t.steps}  loss {m.loss:.4f}  lr {m.lr:.2e}  grad {m.grad_norm:.3f}{tev}"
                   f"  {m.tokens_per_s:,.0f} tok/s  {m.tflops_per_device:.2f} TFLOP/s{mfu}  eta {_fmt_eta(eta)}",
                   flush=True)

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
        if trainer.ctx.is_main:
            self.print(f"eval at step {step}: loss {metrics['val_loss']:.4f}  ppl {metrics['val_ppl']:.2f}",
                       flush=True)


class MetricsFile(Callback):
    """`<run dir>/metrics.jsonl`: one JSON object per step (and per evaluation), rank 0 only.

    It is the ground truth of a run. On resume it is cut back to the checkpoint's step first, so
    the steps redone after a crash appear once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_start(self, trainer: "Trainer") -> None:
        if trainer.step > 0:
            self._cut(trainer)

    def on_rollback(self, trainer: "Trainer", from_step: int) -> None:
        self._cut(trainer)

    def _cut(self, trainer: "Trainer") -> None:
        if trainer.ctx.is_main and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= trainer.step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def _write(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        if trainer.ctx.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer: "Trainer", m: "StepMetrics") -> None:
        self._write(trainer, m.as_dict())

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
        self._write(trainer, {"step": step, **metrics})


class RunSummary(Callback):
    """`<run dir>/summary.json` at the end: last metrics, last evaluation, steps, wall time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: dict[str, Any] = {}
        self.eval: dict[str, float] = {}
        self._start = time.time()

    def on_step_end(self, trainer: "Trainer", m: "StepMetrics") -> None:
        self.last = m.as_dict()

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
        self.eval = {"step": step, **metrics}

    def on_fit_end(self, trainer: "Trainer") -> None:
        if trainer.ctx.is_main:
            self.path.write_text(json.dumps({"steps": trainer.step, "final": self.last, "eval": self.eval,
                                             "wall_time_s": time.time() - self._start}, indent=2) + "\n")
