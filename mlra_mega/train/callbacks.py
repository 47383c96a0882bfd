"""The callback interface, and the callbacks that are not tied to a backend.

Everything that is not the training step hangs off the trainer as a callback: logging,
checkpointing, tracking, stability diagnostics, signals. Callbacks run in the order of their
declared priority (`Priority`: the table of who runs when). Each callback has its own state
(`state_dict` / `load_state_dict`, keyed by its stable `name` in checkpoints) so that it survives
a resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mlra_mega.files import atomic_write_text

if TYPE_CHECKING:
    from mlra_mega.train.trainer import StepMetrics, Trainer

__all__ = ["CONFIG_CHANGES", "Callback", "ConsoleLogger", "MetricsFile", "Priority", "RunSummary", "sort_callbacks"]

# In the run directory: one record per resume that changed settings (written by train.run, sent
# to MLflow as a tag and an artifact by the tracker).
CONFIG_CHANGES = "config_changes.jsonl"


class Priority:
    """Callbacks run in order of their declared `priority`, highest first (ties keep the order
    they were given in). What each band is for:"""

    WATCHDOG = 1000  # Watchdog, HangDrill: a step is counted as finished before anything else runs
    LEDGER = 950  # CommMetrics: the step's communication is closed before any callback communicates
    PROFILER = 900  # StepProfiler: step markers around everything else of the step
    DIAGNOSTICS = 500  # the stability callbacks: they record their metrics
    USER = 0  # the default: a user's callback sees the diagnostics' metrics (trainer.metrics)
    CHECKPOINT = -800  # Checkpointer: saves once every callback state of the step is final
    PREEMPTION = -900  # PreemptionGuard: saves unless the checkpointer just did, then stops the run
    WRITER = -1000  # ConsoleLogger, MetricsFile, RunSummary, MLflowLogger: they act in on_metrics


class Callback:
    """No-op hooks; override what you need.

    Per step, the trainer calls `on_step_start`, `on_before_optimizer_step` (inside the step), `on_step_end` (where
    a callback records metrics with `trainer.record_metric` and may `trainer.request_stop`), then,
    once every callback's `on_step_end` has run, `on_metrics` with the step's complete metrics
    (where writers write them). `name` keys the callback's state in checkpoints: keep it stable.
    """

    priority: ClassVar[int] = Priority.USER
    name: ClassVar[str | None] = None  # None: the class name

    @property
    def state_key(self) -> str:
        return self.name or type(self).__name__

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_step_start(self, trainer: "Trainer") -> None:
        """`trainer.step` is the step about to be made; its data is not fetched yet."""

    def on_before_optimizer_step(self, trainer: "Trainer") -> None:
        """After the step's last backward, before the optimizer: the reduced gradients exist
        (read them with deepspeed.utils.safe_get_full_grad, a collective under ZeRO)."""

    def on_step_end(self, trainer: "Trainer", metrics: "StepMetrics") -> None: ...

    def on_metrics(self, trainer: "Trainer", step: int, metrics: dict[str, Any]) -> None:
        """The step's metrics, complete: the trainer's and every callback's `record_metric`."""

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None: ...

    def on_rollback(self, trainer: "Trainer", from_step: int) -> None:
        """The trainer went back from `from_step` to `trainer.step` (a checkpoint's)."""

    def on_fit_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def sort_callbacks(callbacks: list[Callback]) -> list[Callback]:
    """By declared priority, highest first; a stable sort, so equal priorities keep their order."""
    return sorted(callbacks, key=lambda cb: -cb.priority)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ConsoleLogger(Callback):
    """One line per `train.log_interval` steps on rank 0: step, loss, TEV, tokens/s, ETA."""

    priority = Priority.WRITER
    name = "console"

    def __init__(self, log_interval: int, print_fn=print) -> None:
        self.log_interval, self.print = log_interval, print_fn
        self._start = time.perf_counter()
        self._start_step = 0

    def on_fit_start(self, trainer: "Trainer") -> None:
        self._start, self._start_step = time.perf_counter(), trainer.step

    def on_metrics(self, trainer: "Trainer", step: int, m: dict[str, Any]) -> None:
        total = trainer.total_steps
        if not trainer.ctx.is_main or (step % self.log_interval and step != total):
            return
        done = step - self._start_step
        eta = (time.perf_counter() - self._start) / max(done, 1) * (total - step)
        tev = f"  tev {m['tev/mean']:.5f} +- {m['tev/std']:.5f}" if "tev/mean" in m else ""
        mfu = f"  mfu {m['perf/mfu']:.1%}" if "perf/mfu" in m else ""
        self.print(f"step {step:>6}/{total}  loss {m['train/loss']:.4f}  lr {m['train/lr']:.2e}  "
                   f"grad {m['train/grad_norm']:.3f}{tev}  {m['perf/tokens_per_s']:,.0f} tok/s  "
                   f"{m['perf/tflops_per_device']:.2f} TFLOP/s{mfu}  "
                   f"eta {_fmt_eta(eta)}", flush=True)

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
        if trainer.ctx.is_main:
            self.print(f"eval at step {step}: loss {metrics['eval/loss']:.4f}  ppl {metrics['eval/ppl']:.2f}",
                       flush=True)


class MetricsFile(Callback):
    """`<run dir>/metrics.jsonl`: one JSON object per step (and per evaluation), rank 0 only.

    It is the ground truth of a run. On resume it is cut back to the checkpoint's step first, so
    the steps redone after a crash appear once.
    """

    priority = Priority.WRITER
    name = "metrics_file"

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
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def _write(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        if trainer.ctx.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_metrics(self, trainer: "Trainer", step: int, metrics: dict[str, Any]) -> None:
        self._write(trainer, metrics)

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
        self._write(trainer, {"step": step, **metrics})


class RunSummary(Callback):
    """`<run dir>/summary.json` at the end: last metrics, last evaluation, steps, wall time."""

    priority = Priority.WRITER
    name = "summary"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: dict[str, Any] = {}
        self.eval: dict[str, float] = {}
        self._start = time.time()

    def on_metrics(self, trainer: "Trainer", step: int, metrics: dict[str, Any]) -> None:
        self.last = metrics

    def on_eval_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
        self.eval = {"step": step, **metrics}

    def on_fit_end(self, trainer: "Trainer") -> None:
        if trainer.ctx.is_main:
            atomic_write_text(self.path, json.dumps({"steps": trainer.step, "final": self.last, "eval": self.eval,
                                                     "wall_time_s": time.time() - self._start}, indent=2) + "\n")
