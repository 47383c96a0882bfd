"""`profile.start` / `profile.steps`: a torch profiler trace of a step range, per chosen rank.

The trace covers whole steps, from the start of step `start` (before its data fetch) to the start
of the step after the last profiled one (or the end of the run), so it holds the data fetch,
forward, backward, optimizer, TEV, every callback and evaluation of those steps,
each step marked as `ProfilerStep#N`. Written to `<run dir>/profile/rankNNNNN.trace.json`
(chrome://tracing or https://ui.perfetto.dev) with `rankNNNNN.txt`, the operators sorted by their
own CPU time (and CUDA time where there is a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mlra_mega.config import ProfileConfig
from mlra_mega.train.callbacks import Callback, Priority

__all__ = ["StepProfiler"]


class StepProfiler(Callback):
    priority = Priority.PROFILER
    name = "profiler"

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, log: Callable[[str], None]) -> None:
        self.cfg, self.rank, self.log = cfg, rank, log
        self.out = run_dir / "profile"
        self.enabled = bool(cfg.start) and (cfg.ranks is None or rank in cfg.ranks)
        self._prof: torch.profiler.profile | None = None
        self._mark: torch.profiler.record_function | None = None

    def _begin(self, first_step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=self.cfg.record_shapes,
                                            with_stack=self.cfg.with_stack)
        self._prof.start()
        self._mark_step(first_step)

    def _mark_step(self, step: int | None) -> None:
        # Our own step markers: the profiler's need its schedule, which would number steps from 0.
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark = None
        if step is not None:
            self._mark = torch.profiler.record_function(f"ProfilerStep#{step}")
            self._mark.__enter__()

    def _finish(self, last_step: int) -> None:
        self._mark_step(None)
        prof, self._prof = self._prof, None
        prof.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"rank{self.rank:05d}.trace.json"
        prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (self.out / f"rank{self.rank:05d}.txt").write_text(
            prof.key_averages().table(sort_by=sort, row_limit=60) + "\n")
        self.log(f"[profile] rank {self.rank}: steps {self.cfg.start}-{last_step} traced to {trace} "
                 "(open in https://ui.perfetto.dev or chrome://tracing); operator table beside it")

    def on_step_start(self, trainer) -> None:
        if not self.enabled:
            return
        if self._prof is None:
            if trainer.step == self.cfg.start:
                self._begin(trainer.step)
        elif trainer.step > min(self.cfg.last, trainer.end_step):
            self._finish(trainer.step - 1)
        else:
            self._mark_step(trainer.step)

    def on_fit_end(self, trainer) -> None:
        if self._prof is not None:  # the last profiled step was the run's last, or the run was stopped
            self._finish(trainer.step)
