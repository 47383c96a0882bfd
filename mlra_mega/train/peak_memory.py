"""`metrics.memory_interval`: the peak memory of the ranks as step metrics.

Every N steps one all-reduce (MAX) over the world of each rank's peak host memory (the process's
maximum resident set) and, on a GPU, its peak allocated accelerator memory, each with the rank
that holds it: `perf/peak_host_gib`, `perf/peak_host_rank`, `perf/peak_accel_gib`,
`perf/peak_accel_rank`. The rank whose memory runs out first is the one a layout must be sized
for, and it is rarely rank 0 (the last pipeline stage holds the output layer; ZeRO partitions
are uneven). It runs after the communication ledger closed the step, so its all-reduce is not
counted as the step's.
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from mlra_mega.distributed import ParallelContext
from mlra_mega.train.callbacks import Callback, Priority

if TYPE_CHECKING:
    from mlra_mega.train.trainer import StepMetrics, Trainer

__all__ = ["PeakMemory", "host_peak_bytes"]

GIB = float(1 << 30)


def host_peak_bytes() -> int:
    """This process's peak resident set (Linux reports it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory(Callback):
    priority = Priority.DIAGNOSTICS
    name = "peak_memory"

    def __init__(self, every: int, ctx: ParallelContext) -> None:
        self.every, self.ctx = every, ctx
        self.cuda = ctx.device.type == "cuda"

    def on_step_end(self, trainer: "Trainer", metrics: "StepMetrics") -> None:
        if trainer.step % self.every:
            return
        accel = torch.cuda.max_memory_allocated(self.ctx.device) if self.cuda else 0
        # Value and rank in one tensor per kind: a rank's value scaled above any rank number, so the
        # MAX picks the largest value and, among equal ones, the highest rank.
        world = self.ctx.world_size
        mine = torch.tensor([host_peak_bytes() * world + self.ctx.rank, accel * world + self.ctx.rank],
                            dtype=torch.int64, device=self.ctx.device)
        if world > 1:
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        (host, host_rank), (acc, acc_rank) = (divmod(int(v), world) for v in mine)
        trainer.record_metric("perf/peak_host_gib", host / GIB)
        trainer.record_metric("perf/peak_host_rank", float(host_rank))
        if self.cuda:
            trainer.record_metric("perf/peak_accel_gib", acc / GIB)
            trainer.record_metric("perf/peak_accel_rank", float(acc_rank))
