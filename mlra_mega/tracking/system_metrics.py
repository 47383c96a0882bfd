"""MLflow's own system metrics (CPU, memory, disk, network; GPU utilisation and memory where
`nvidia-ml-py` finds one) from rank 0 of each node, into the run's "System metrics" tab.

MLflow's `SystemMetricsMonitor` samples in a thread of its own every
`metrics.system_metrics_interval_s` seconds and logs `system/<name>` (one node), or
`system/<host>/<name>` when the run spans several hosts. It needs the run's id, which rank 0's
sender thread makes (or resumes) and writes to `<run dir>/mlflow-run-id`: each node's rank 0
starts its monitor once that file is there (the run directory is on the shared filesystem that
checkpoints need anyway), continuing the step count of a resumed run.

The monitor ends itself when it cannot reach the server; it is started again at a later step
(at most once per interval), so an outage leaves a gap in the system metrics and nothing else.
At the end of the run it is stopped and flushed within `tracking.final_flush_s`, never longer.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

from mlra_mega.tracking.mlflow import RUN_ID_FILE
from mlra_mega.train.callbacks import Callback, Priority

__all__ = ["SystemMetrics"]

# Its start and stop lines would land in every run's console.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


class SystemMetrics(Callback):
    # Before the MLflow logger's on_fit_end ends the run: its last samples land in a RUNNING run.
    priority = Priority.WRITER + 1
    name = "system_metrics"

    def __init__(self, uri: str, run_dir: Path, interval_s: float, final_flush_s: float) -> None:
        self.uri, self.run_dir, self.interval_s, self.final_flush_s = uri, run_dir, interval_s, final_flush_s
        self.node_id: str | None = None
        self.monitor: Any = None
        self._active = False
        self._last_try = -float("inf")
        self._starter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.starts = 0

    def on_fit_start(self, trainer) -> None:
        import torch.distributed as dist

        host = socket.gethostname()
        hosts = [host]
        if dist.is_initialized() and dist.get_world_size() > 1:  # a collective: every rank
            hosts = [None] * dist.get_world_size()
            dist.all_gather_object(hosts, host)
        self._active = trainer.ctx.local_rank == 0
        self.node_id = host if len(set(hosts)) > 1 else None
        self._ensure()

    def on_step_end(self, trainer, metrics) -> None:
        if self._active:
            self._ensure()

    def _ensure(self) -> None:
        """A monitor running for the run: started, off the step loop, when the run has an id and
        neither a monitor nor a start is under way."""
        if not self._active or self._closed:
            return
        if self._starter is not None and self._starter.is_alive():
            return
        if self.monitor is not None and self.monitor._process is not None and self.monitor._process.is_alive():
            return
        now = time.monotonic()
        run_id_file = self.run_dir / RUN_ID_FILE
        if now - self._last_try < self.interval_s or not run_id_file.is_file():
            return
        self._last_try = now
        run_id = run_id_file.read_text().strip()
        if run_id:
            # Making a monitor that resumes asks the server for the run: a server that is away
            # would hold the step loop for MLflow's whole retry schedule.
            self._starter = threading.Thread(target=self._start, args=(run_id,), name="system-metrics-start",
                                             daemon=True)
            self._starter.start()

    def _start(self, run_id: str) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            monitor = SystemMetricsMonitor(run_id, sampling_interval=self.interval_s, resume_logging=True,
                                           node_id=self.node_id, tracking_uri=self.uri)
        except Exception:  # the server is away: the next try is an interval later
            return
        with self._lock:
            if self._closed:
                return
            monitor.start()
            self.monitor = monitor
            self.starts += 1

    def on_fit_end(self, trainer) -> None:
        with self._lock:
            self._closed = True
            monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        # finish() joins the sampler and flushes to the server; bounded, as the MLflow logger's flush.
        done = threading.Thread(target=monitor.finish, name="system-metrics-finish", daemon=True)
        done.start()
        done.join(timeout=self.final_flush_s)
