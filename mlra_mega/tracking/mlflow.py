"""MLflow tracking from rank 0: one run per training run, resumed by id, every step exactly once.

Default store: one embedded SQLite store for every run under the runs root
(`sqlite:////abs/runs-root/mlflow.db`, artifacts under `<runs root>/mlartifacts/`, absolute), so
runs of one experiment sit side by side in the MLflow UI with no server. `tracking.uri` or
MLFLOW_TRACKING_URI points at a tracking server instead. This module is imported only when
tracking is on. Params: the flattened resolved config. Tags: git SHA, package versions, layout,
hosts.

The step loop never talks to MLflow: it puts each record (step, timestamp, metrics) on a queue
and goes on. One sender thread does everything else - creating or resuming the run, params, tags,
metrics in batches. Records it has not yet seen confirmed sit in `<run dir>/mlflow-buffer.jsonl`.
While the server is unreachable they accumulate there and training goes on at full speed; when
it answers again (or at the end of the run, waiting at most `tracking.final_flush_s`) they are
replayed in order. MLflow's log_batch is not idempotent, so a replay first asks the server which
points (key, step, timestamp) it already holds - a batch whose answer was lost may have landed -
and sends only the others.

Exactly once: after a clean stop every step is in MLflow once. After a crash the steps after the
checkpoint run again; MLflow cannot delete points, so the resumed run logs them again (later
timestamps: the last value of every step is the resumed run's) and the range goes into the
`replayed_steps` tag, as after a rollback. On resume, steps of metrics.jsonl up to the checkpoint
that the server lacks (a crash mid-outage) are sent then; `mlra-mega sync-tracking RUN_DIR` does
the same for a run that ended while the server was down.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlra_mega.config import RunConfig, TrackingConfig, load_config
from mlra_mega.credentials import MASK, mask, strip_masked
from mlra_mega.errors import ConfigError
from mlra_mega.files import atomic_write_text
from mlra_mega.train.callbacks import CONFIG_CHANGES, Callback, Priority
from mlra_mega.train.checkpoint import package_versions

__all__ = ["BUFFER", "MLflowLogger", "check_tracking_store", "default_tracking_uri", "sync_run", "tracking_uri",
           "run_page_url", "ui_command"]

os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

BUFFER = "mlflow-buffer.jsonl"
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
RUN_ID_FILE = "mlflow-run-id"
_BATCH = 900  # MLflow takes at most 1000 metrics per log_batch
_PARAM_BATCH = 90  # and at most 100 params
_RETRY_S = (1, 2, 4, 8, 15)  # waits between attempts while the server is away


def default_tracking_uri(runs_root: str | Path) -> str:
    return f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: RunConfig) -> str:
    """The store a run of `cfg` logs to."""
    return store_uri(cfg.tracking, cfg.run.root)


def store_uri(tracking: TrackingConfig, runs_root: str | Path) -> str:
    """`tracking.uri`, else MLFLOW_TRACKING_URI, else the embedded SQLite store under `runs_root`."""
    uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_root)
    # A URI read back from a file we wrote is masked: its credentials come from MLflow's variables.
    return strip_masked(uri) if MASK in uri else uri


_SCHEMES = {"http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "databricks-uc", "uc"}
_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_tracking_store(uri: str) -> None:
    """A store that can never work is a ConfigError now, not an 'outage' later: a malformed URI, a
    scheme MLflow has no store for, a SQLite file that is not a database or cannot be written.
    Servers are not contacted here (an unreachable server is an outage the run rides out)."""
    shown = mask(uri)
    fix = "use http(s)://HOST:PORT for a server, sqlite:////ABS/PATH.db for a file store, or unset tracking.uri"
    if "://" not in uri and ":" not in uri.split("/", 1)[0]:
        return  # a local directory: MLflow's file store
    try:
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        base = scheme.split("+", 1)[0]  # postgresql+psycopg2 and the like
        if base not in _SCHEMES:
            raise ConfigError("tracking.uri", f"{shown!r}: MLflow has no tracking store for the scheme {scheme!r}", fix)
        if base in ("http", "https"):
            if not parts.hostname:
                raise ConfigError("tracking.uri", f"{shown!r} names no host", fix)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ConfigError("tracking.uri", f"{shown!r} is not a valid URI ({exc})", fix) from None
    if base != "sqlite":
        return
    if not uri.startswith("sqlite:///"):
        raise ConfigError("tracking.uri", f"{shown!r} is not a SQLite URI", "write sqlite:////ABS/PATH.db or "
                          "sqlite:///RELATIVE/PATH.db")
    path = Path(uri[len("sqlite:///"):])
    if path.is_dir():
        raise ConfigError("tracking.uri", f"{path} is a directory, not a SQLite file", fix)
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            raise ConfigError("tracking.uri", f"{path} is not a SQLite database (corrupt, or another kind of file)",
                              "point tracking.uri at a good store, or move the file away to start a new one")
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
            raise ConfigError("tracking.uri", f"{path} (or its directory) is read-only: MLflow cannot write to it",
                              "make it writable, or point tracking.uri / run.root elsewhere")
    else:
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK):
            raise ConfigError("tracking.uri", f"{path} cannot be created: {parent} is read-only",
                              "point tracking.uri / run.root at a writable place")


def _permanent(exc: BaseException) -> str | None:
    """What makes this failure one that waiting will not cure, or None for an outage."""
    text = f"{type(exc).__name__}: {exc}"
    for needle, what in (("readonly database", "the store is read-only"),
                         ("file is not a database", "the store is not a SQLite database"),
                         ("database disk image is malformed", "the store is corrupt"),
                         ("Could not find a registered", "MLflow has no store for this URI"),
                         ("UNAUTHENTICATED", "the server refused the credentials"),
                         ("PERMISSION_DENIED", "the server refused access"),
                         ("401", "the server refused the credentials"), ("403", "the server refused access")):
        if needle in text and (needle not in ("401", "403") or "status code" in text or "HTTP" in text):
            return what
    return None


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {mask(uri)}"


def run_page_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's charts in MLflow's model-training view. MLflow 3's UI picks its view from the
    `workflowType` parameter (else the browser's last choice, GenAI by default), so the link
    names it; older UIs read the experiment's `mlflow.experimentKind` tag, which is set too.
    A local store's page is what `mlflow ui` serves on its default port."""
    base = strip_masked(mask(uri)).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?workflowType=machine_learning"


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


def _points(record: dict[str, Any]) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp ms, step) of a buffered record's numeric metrics."""
    return [(k, float(v), record["ts"], record["step"]) for k, v in record["metrics"].items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]


def _held(client: Any, run_id: str, keys: set[str], with_timestamps: bool = True) -> set[tuple]:
    """What the server holds of `keys`: {(key, step, timestamp)} (or {(key, step)})."""
    out = set()
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            out.add((key, m.step, m.timestamp) if with_timestamps else (key, m.step))
    return out


def _send(client: Any, run_id: str, records: list[dict[str, Any]], check_server: bool) -> int:
    """Logs the records' points in order; with `check_server`, only those the server lacks."""
    from mlflow.entities import Metric

    points = [p for r in records for p in _points(r)]
    if check_server and points:
        held = _held(client, run_id, {p[0] for p in points})
        points = [p for p in points if (p[0], p[3], p[2]) not in held]
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in points]
    for i in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + _BATCH])
    return len(metrics)


def _add_replayed_tag(client: Any, run_id: str, first: int, last: int) -> None:
    tags = client.get_run(run_id).data.tags
    ranges = [r for r in tags.get("replayed_steps", "").split(",") if r]
    client.set_tag(run_id, "replayed_steps", ",".join([*ranges, f"{first}-{last}"]))


def _steps_of(path: Path, up_to: int | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl as buffered records (timestamp: now), steps up to `up_to`."""
    if not path.is_file():
        return []
    now = int(time.time() * 1000)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "ts": now, "metrics": r} for r in records if up_to is None or r["step"] <= up_to]


def _missing_from_server(client: Any, run_id: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The (key, step) points of `records` the server lacks, as records."""
    held = _held(client, run_id, {p[0] for r in records for p in _points(r)}, with_timestamps=False)
    out = []
    for r in records:
        metrics = {k: v for k, v in r["metrics"].items() if k != "step" and (k, r["step"]) not in held}
        if metrics:
            out.append({**r, "metrics": metrics})
    return out


class MLflowLogger(Callback):
    """Rank 0 logs through its sender thread; other ranks only take part in the host-name gather."""

    priority = Priority.WRITER
    name = "mlflow"

    def __init__(self, tracking: TrackingConfig, run_dir: Path, *, params: dict[str, Any], runs_root: str | Path,
                 zero_stage: int) -> None:
        """`params`: the run's settings, flattened and with credentials masked (logged once, as params)."""
        self.tracking, self.run_dir, self.params = tracking, run_dir, params
        self.runs_root, self.zero_stage = Path(runs_root), zero_stage
        self.run_id: str | None = None
        self.uri = store_uri(tracking, runs_root)
        self.buffer = run_dir / BUFFER
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._pending: list[dict[str, Any]] = []  # not yet confirmed, also in the buffer file
        self._uncertain = False  # a send failed: the server may hold part of what is pending
        self._setup: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # pending list and buffer file; held for local work only
        # Held by the sender from taking records off the queue until they are in the pending list,
        # so the final flush cannot miss records the sender has in hand (it never spans a request).
        self._moving = threading.Lock()
        self.outages = 0  # separate times the server could not be reached
        self.sent = 0

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id

    # -- the step loop's side: no MLflow calls here, only the queue --------------------------

    def on_fit_start(self, trainer) -> None:
        hosts = _hosts()  # a collective: every rank
        if not trainer.ctx.is_main:
            return
        if self.run_id is None and (self.run_dir / RUN_ID_FILE).is_file():
            self.run_id = (self.run_dir / RUN_ID_FILE).read_text().strip() or None  # made before any checkpoint
        ctx = trainer.ctx
        stages = f"xpp{ctx.pp_size}" if ctx.pp_size > 1 else ""
        self._setup = {"hosts": hosts, "layout": f"tp{ctx.tp_size}{stages}xdp{ctx.dp_size}", "world_size": ctx.world_size,
                       "resumed_at": trainer.step}
        if self.buffer.is_file():  # a previous job's unsent records; the steps after its checkpoint run again
            left = [json.loads(x) for x in self.buffer.read_text().splitlines() if x.strip()]
            self._pending = [r for r in left if r["step"] <= trainer.step]
            self._uncertain = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    def on_metrics(self, trainer, step: int, metrics: dict[str, Any]) -> None:
        if trainer.ctx.is_main:
            self._queue.put({"step": step, "ts": int(time.time() * 1000), "metrics": dict(metrics)})

    def on_eval_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if trainer.ctx.is_main:
            self._queue.put({"step": step, "ts": int(time.time() * 1000), "metrics": dict(metrics)})

    def on_rollback(self, trainer, from_step: int) -> None:
        if trainer.ctx.is_main:
            self._queue.put({"replayed": [trainer.step + 1, from_step]})  # the steps after the checkpoint's

    def on_fit_end(self, trainer) -> None:
        if not trainer.ctx.is_main or self._thread is None:
            return
        status = "FINISHED" if trainer.step >= trainer.total_steps else "KILLED"
        self._queue.put({"end": status})
        self._thread.join(timeout=self.tracking.final_flush_s)
        if self._thread.is_alive():
            self._stop.set()
            # The sender may be stuck in a request: put everything on disk now. Its queue waits end
            # within 0.5 s of the stop, so the _moving lock is free by then.
            with self._moving, self._lock:
                self._pending.extend(r for r in self._drain(0) if "step" in r)
                self._write_buffer()
            print(f"[mlflow] {mask(self.uri)} did not answer within tracking.final_flush_s="
                  f"{self.tracking.final_flush_s:g}s; unsent records are kept in {self.buffer} and go out when "
                  f"this run resumes, or with: mlra-mega sync-tracking {self.run_dir}", file=sys.stderr, flush=True)
        self._thread = None

    # -- the sender thread ---------------------------------------------------------------------

    def _connect(self) -> None:
        """Client, experiment and run (created, or resumed by id), params and tags: once."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        setup = self._setup
        if self.run_id is not None:
            client.update_run(self.run_id, status="RUNNING")
            extra = dict(t.split("=", 1) for t in self.tracking.tags)
            if self.tracking.parent_run_id:  # a run started alone, resumed as a sweep's member
                extra["mlflow.parentRunId"] = self.tracking.parent_run_id
            changes = self.run_dir / CONFIG_CHANGES
            if changes.is_file():  # params cannot be overwritten: settings changed on resume go in a tag
                last = changes.read_text().strip().splitlines()[-1]
                extra["config_changes"] = last[:5000]
            for k, v in extra.items():
                client.set_tag(self.run_id, k, v)
            resumed = setup["resumed_at"]
            if resumed > 0:
                # A crash mid-outage can leave steps of metrics.jsonl (up to the checkpoint) unsent.
                mine = _steps_of(self.run_dir / "metrics.jsonl", up_to=resumed)
                self._pending = _missing_from_server(client, self.run_id, mine) + self._pending
                logged = [m.step for m in client.get_metric_history(self.run_id, "train/loss")]
                if logged and max(logged) > resumed:
                    _add_replayed_tag(client, self.run_id, resumed + 1, max(logged))
        else:
            name = self.tracking.experiment
            exp = client.get_experiment_by_name(name)
            if exp is None:
                location = None
                if self.uri.startswith("sqlite:") and not self.tracking.uri:
                    location = (self.runs_root.resolve() / "mlartifacts" / name).as_uri()
                exp_id = client.create_experiment(name, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            if exp is None or EXPERIMENT_KIND not in exp.tags:  # never over a kind the user set
                # Without it MLflow 3's UI opens the experiment in its GenAI view (traces and
                # evaluations); this kind opens the model-training view, charts first.
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND, MODEL_TRAINING)
            run_id = client.create_run(exp_id, run_name=self.run_dir.name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in self.params.items()]
            for i in range(0, len(params), _PARAM_BATCH):
                client.log_batch(run_id, params=params[i:i + _PARAM_BATCH])
            tags = {"git_sha": _git_sha(), "layout": setup["layout"], "world_size": str(setup["world_size"]),
                    "zero_stage": str(self.zero_stage), "hosts": setup["hosts"],
                    "run_dir": str(self.run_dir.resolve()),
                    **{f"version.{k}": v for k, v in package_versions().items()},
                    **dict(t.split("=", 1) for t in self.tracking.tags)}
            if self.tracking.parent_run_id:
                tags["mlflow.parentRunId"] = self.tracking.parent_run_id
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
            self.run_id = run_id
            atomic_write_text(self.run_dir / RUN_ID_FILE, run_id + "\n")
            print(f"[mlflow] run page: {run_page_url(self.uri, exp_id, run_id)}", flush=True)
        self._client = client

    def _write_buffer(self, new: list[dict[str, Any]] | None = None) -> None:
        """All that is pending (None), or just the `new` records appended."""
        if new is not None:
            with self.buffer.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in new))
            return
        atomic_write_text(self.buffer, "".join(json.dumps(r) + "\n" for r in self._pending))

    def _drain(self, wait_s: float | None) -> list[dict[str, Any]]:
        """Everything queued: after waiting for the first item and then `tracking.send_interval_s`
        more (None), or for `wait_s` in full. The end of the run cuts either wait short."""
        items: list[dict[str, Any]] = []
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while not self._stop.is_set():
            left = 0.5 if deadline is None else min(deadline - time.monotonic(), 0.5)
            if left <= 0:
                break
            try:
                items.append(self._queue.get(timeout=left))
            except queue.Empty:
                continue
            if "end" in items[-1]:
                break
            if deadline is None:
                # One batch per interval: every send costs the step loop CPU (and the GIL).
                deadline = time.monotonic() + self.tracking.send_interval_s
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _send_loop(self) -> None:
        failures, end, replayed, outage_since = 0, None, [], None
        while not self._stop.is_set():
            if failures:
                wait: float | None = _RETRY_S[min(failures, len(_RETRY_S)) - 1]
            else:
                wait = 0 if self._pending or self._client is None else None
            with self._moving:
                items = self._drain(wait)
                records = [item for item in items if "step" in item]
                with self._lock:
                    self._pending.extend(records)
                    if records and failures:
                        self._write_buffer(records)  # the server is away: what it has not got waits on disk
                    batch = list(self._pending)
            if self._stop.is_set():
                return  # the final flush has put everything pending on disk
            for item in items:
                if "end" in item:
                    end = item["end"]
                elif "replayed" in item:
                    replayed.append(item["replayed"])
            try:
                if self._client is None:
                    self._connect()
                for first, last in replayed:
                    _add_replayed_tag(self._client, self.run_id, first, last)
                replayed = []
                self.sent += _send(self._client, self.run_id, batch, check_server=self._uncertain)
                with self._lock:
                    if self._stop.is_set():
                        # The run ended while this send was under way: the final flush has put the
                        # batch on disk, and the buffer is sync-tracking's now (which sends only
                        # what the server lacks), not this thread's to rewrite or delete.
                        return
                    del self._pending[:len(batch)]
                    self._uncertain = bool(self._pending) and self._uncertain
                    if failures or self.buffer.exists():
                        self._write_buffer() if self._pending else self.buffer.unlink(missing_ok=True)
                if failures:
                    print(f"[mlflow] {mask(self.uri)} answers again after {time.monotonic() - outage_since:.0f}s; "
                          "the buffered records are in", file=sys.stderr, flush=True)
                failures = 0
                if end is not None and not self._pending:
                    self._client.set_terminated(self.run_id, status=end)
                    self._log_artifacts()
                    return
            except Exception as exc:  # noqa: BLE001 - an outage must never stop training
                if not failures:
                    self.outages += 1
                    outage_since = time.monotonic()
                    detail = f"{type(exc).__name__}: {mask(str(exc)).splitlines()[0][:200] if str(exc) else ''}"
                    permanent = _permanent(exc)
                    if permanent:
                        print(f"[mlflow] {mask(self.uri)} cannot take this run: {permanent} ({detail}); this is not "
                              f"an outage and will not pass by itself. Training goes on, records wait in "
                              f"{self.buffer}; fix the store, then: mlra-mega sync-tracking {self.run_dir}",
                              file=sys.stderr, flush=True)
                    else:
                        print(f"[mlflow] cannot reach {mask(self.uri)} ({detail}); training goes on, records "
                              f"wait in {self.buffer}", file=sys.stderr, flush=True)
                failures += 1
                with self._lock:
                    self._uncertain = True
                    self._write_buffer()

    def _log_artifacts(self) -> None:
        for name in ("config.yaml", "deepspeed.json", "summary.json", CONFIG_CHANGES):
            path = self.run_dir / name
            if path.is_file():
                self._client.log_artifact(self.run_id, str(path))


def sync_run(run_dir: Path, uri: str | None = None) -> int:
    """Sends what the server lacks of a finished or stopped run: the buffer, then metrics.jsonl
    (points missing by key and step). Returns the number of points sent."""
    from mlflow.tracking import MlflowClient

    run_dir = Path(run_dir)
    if not (run_dir / RUN_ID_FILE).is_file():
        raise ConfigError("RUN_DIR", f"{run_dir} has no {RUN_ID_FILE}: its MLflow run was never created",
                          "give a run directory whose run reached the tracking server or store once")
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else load_config()
    # config.yaml holds the URI masked; its credentials come from MLflow's variables.
    client = MlflowClient(tracking_uri=uri or tracking_uri(cfg))
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    sent = 0
    if (run_dir / BUFFER).is_file():
        left = [json.loads(x) for x in (run_dir / BUFFER).read_text().splitlines() if x.strip()]
        sent += _send(client, run_id, left, check_server=True)
        (run_dir / BUFFER).unlink()
    sent += _send(client, run_id, _missing_from_server(client, run_id, _steps_of(run_dir / "metrics.jsonl")),
                  check_server=False)
    return sent
