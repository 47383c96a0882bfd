"""`metrics.comm_interval`: the communication ledger as step metrics.

While the run trains, `comm.ledger.Ledger` counts every collective and point-to-point call of
this rank per process group (tp, dp, pp, mp = TP x PP, embedding = the tied embedding's two
stages, world). A step is what happens from its `on_step_start` to this callback's `on_step_end`,
which runs before every other callback's (`Priority.LEDGER`): the micro-batches' forward and
backward, the optimizer, the non-finite agreement, TEV, the loss's mean; not what the callbacks,
the evaluation or a checkpoint communicate after it. Every `comm_interval` steps the step's totals
are recorded: `comm/<group>/bytes`, `comm/<group>/calls`, `comm/<group>/time_s` (the time the
step waited for its batches is a step metric, `perf/data_wait_s`). With the interval 0 nothing
is wrapped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlra_mega.comm.ledger import Ledger
from mlra_mega.distributed import ParallelContext
from mlra_mega.train.callbacks import Callback, Priority

if TYPE_CHECKING:
    from mlra_mega.train.trainer import StepMetrics, Trainer

__all__ = ["CommMetrics", "group_names"]


def group_names(ctx: ParallelContext) -> dict[str, Any]:
    """The layout's process groups by the names the metrics use (groups of one rank left out)."""
    groups = {"tp": (ctx.tp_group, ctx.tp_size), "dp": (ctx.dp_group, ctx.dp_size), "pp": (ctx.pp_group, ctx.pp_size),
              "mp": (ctx.mp_group, ctx.tp_size * ctx.pp_size),
              "embedding": (ctx.embedding_group, 2 if ctx.in_embedding_group and ctx.pp_size > 1 else 1)}
    return {name: group for name, (group, size) in groups.items() if group is not None and size > 1}


class CommMetrics(Callback):
    priority = Priority.LEDGER
    name = "comm_metrics"

    def __init__(self, every: int, ctx: ParallelContext) -> None:
        self.every, self.groups = every, group_names(ctx)
        self.ledger: Ledger | None = None
        self.last: dict = {}  # {(group, method): CallStats} of the last recorded step (benchmarks read it)

    def on_fit_start(self, trainer: "Trainer") -> None:
        self.ledger = Ledger(self.groups)
        self.ledger.install()

    def on_step_start(self, trainer: "Trainer") -> None:
        if self.ledger is not None:
            self.ledger.take()  # what came between two steps (evaluation, checkpoints) is not a step's

    def on_step_end(self, trainer: "Trainer", metrics: "StepMetrics") -> None:
        if self.ledger is None:
            return
        stats = self.ledger.take()
        if trainer.step % self.every:
            return
        self.last = stats
        for group, s in sorted(Ledger.by_group(stats, self.groups).items()):
            trainer.record_metric(f"comm/{group}/bytes", float(s.bytes))
            trainer.record_metric(f"comm/{group}/calls", float(s.calls))
            trainer.record_metric(f"comm/{group}/time_s", s.time_s)

    def on_fit_end(self, trainer: "Trainer") -> None:
        if self.ledger is not None:
            self.ledger.uninstall()
            self.ledger = None
