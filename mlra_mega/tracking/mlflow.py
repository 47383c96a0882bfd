"""MLflow tracking from rank 0: one run per training run, resumed by id, metrics from a thread.

Default store: one embedded SQLite store for every run under the runs root
(`sqlite:////abs/runs-root/mlflow.db`, artifacts under `<runs root>/mlartifacts/`, absolute), so
runs of one experiment sit side by side in the MLflow UI with no server. `tracking.uri` or
MLFLOW_TRACKING_URI points at a tracking server instead. This module is imported only when
tracking is on.

Params: the flattened resolved config. Tags: the project's git SHA, package versions, the world
layout, host names. Metrics: every recorded step, queued and sent in batches by a background
thread so a slow server never stalls a step; MLflow's HTTP timeout and retries are set
deliberately (short timeout, a few retries) unless the environment sets them. The run id is
part of the callback state, so it goes into checkpoints and a resumed run continues the same
MLflow run, without logging a step twice.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mlra_mega.config import RunConfig, flatten
from mlra_mega.train.callbacks import Callback

__all__ = ["default_tracking_uri", "tracking_uri", "MLflowLogger", "ui_command"]

os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

_BATCH = 900  # MLflow takes at most 1000 metrics per log_batch
_PARAM_BATCH = 90  # and at most 100 params


def default_tracking_uri(runs_root: str | Path) -> str:
    return f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(cfg.run.root)


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _hosts() -> str:
    import torch.distributed as dist

    names = [socket.gethostname()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, names[0])
        names = sorted(set(gathered))
    return ",".join(names)


class MLflowLogger(Callback):
    """Rank 0 logs; other ranks only take part in the host-name gather."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.run_id: str | None = None
        self.uri = tracking_uri(cfg)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._logged_steps: set[int] = set()
        self._client = None
        self.failures = 0

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")

    def on_fit_start(self, trainer) -> None:
        hosts = _hosts()  # a collective: every rank
        if not trainer.ctx.is_main:
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from mlra_mega.train.checkpoint import package_versions

        self._client = client = MlflowClient(tracking_uri=self.uri)
        name = self.cfg.tracking.experiment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:") and not self.cfg.tracking.uri:
                location = (Path(self.cfg.run.root).resolve() / "mlartifacts" / name).as_uri()
            exp_id = client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        if self.run_id is not None:
            client.update_run(self.run_id, status="RUNNING")
            self._logged_steps = {m.step for m in client.get_metric_history(self.run_id, "loss")}
        else:
            run = client.create_run(exp_id, run_name=self.run_dir.name)
            self.run_id = run.info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(self.cfg).items()]
            for i in range(0, len(params), _PARAM_BATCH):
                client.log_batch(self.run_id, params=params[i:i + _PARAM_BATCH])
            ctx = trainer.ctx
            tags = {"git_sha": _git_sha(), "layout": f"tp{ctx.tp_size}xdp{ctx.dp_size}", "world_size": str(ctx.world_size),
                    "zero_stage": str(self.cfg.zero.stage), "hosts": hosts, "run_dir": str(self.run_dir.resolve()),
                    **{f"version.{k}": v for k, v in package_versions().items()}}
            for k, v in tags.items():
                client.set_tag(self.run_id, k, v)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.ctx.is_main and metrics.step not in self._logged_steps:
            self._queue.put((metrics.step, metrics.as_dict()))

    def on_eval_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if trainer.ctx.is_main:
            self._queue.put((step, dict(metrics)))

    def _send(self, items: list[tuple[int, dict[str, Any]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for step, record in items for k, v in record.items()
                 if k != "step" and isinstance(v, (int, float))]
        for i in range(0, len(batch), _BATCH):
            self._client.log_batch(self.run_id, metrics=batch[i:i + _BATCH])

    def _send_loop(self) -> None:
        pending: list[tuple[int, dict[str, Any]]] = []
        while True:
            item = self._queue.get()
            stop = item is None
            if not stop:
                pending.append(item)
            while not self._queue.empty() and len(pending) < 200:
                nxt = self._queue.get()
                if nxt is None:
                    stop = True
                    break
                pending.append(nxt)
            try:
                self._send(pending)
                pending = []
            except Exception as exc:  # noqa: BLE001 - a tracking outage must not stop training
                self.failures += 1
                print(f"[mlflow] could not send {len(pending)} records ({type(exc).__name__}: {exc}); "
                      "will retry", file=sys.stderr, flush=True)
                time.sleep(min(30, 2 ** min(self.failures, 5)))
            if stop:
                if pending:
                    try:
                        self._send(pending)
                    except Exception as exc:  # noqa: BLE001
                        print(f"[mlflow] giving up on {len(pending)} records: {exc}; they are in metrics.jsonl",
                              file=sys.stderr, flush=True)
                return

    def flush(self) -> None:
        """Sends everything queued so far and restarts the sender (used before a checkpoint)."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    def on_fit_end(self, trainer) -> None:
        if not trainer.ctx.is_main or self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        for name in ("config.yaml", "deepspeed.json", "summary.json"):
            path = self.run_dir / name
            if path.is_file():
                self._client.log_artifact(self.run_id, str(path))
        status = "FINISHED" if trainer.step >= self.cfg.train.steps else "KILLED"
        self._client.set_terminated(self.run_id, status=status)
