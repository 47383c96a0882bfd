"""MLflow tracking through outages, against a real `mlflow server` on 127.0.0.1.

The server is stopped and restarted in the middle of a run: every step (and evaluation) ends up
in MLflow exactly once with the values of metrics.jsonl, and no MLflow call is ever made from the
step loop's thread. A server still down at the end leaves a buffer that `mlra-mega sync-tracking`
sends later. A replay sends only the points the server lacks. After a crash, the steps run again
are tagged and their last values are the resumed run's.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mlra_mega.cli import main
from mlra_mega.config import load_config
from mlra_mega.train.callbacks import Callback
from tests.train.test_checkpoint import overrides, steps

REPO = Path(__file__).resolve().parents[2]
KEYS = ("train/loss", "train/lr", "train/grad_norm", "tev/mean", "train/consumed_samples")


class Server:
    """`mlflow server --workers 1` on a free port over one SQLite file, stopped and started at will."""

    def __init__(self, root: Path, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> None:
        """`prefix` runs the server under another command (`nsenter --net=...`: on a node's
        address, in its network namespace), where a free port here is free too."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.proc, self.host, self.prefix = root, None, host, prefix
        self.uri = f"http://{host}:{self.port}"

    def start(self, wait: bool = True) -> None:
        cmd = [*self.prefix, sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        if wait:
            self.wait_up()

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_up(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not self.up():
            assert time.time() < deadline, (self.root / "server.log").read_text()[-2000:]
            time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        assert not self.up()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture
def client_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The thread of every MlflowClient call made from now on."""
    from mlflow.tracking import MlflowClient

    seen: list[str] = []
    for name in ("log_batch", "get_metric_history", "create_run", "update_run", "set_tag", "get_run",
                 "set_terminated", "log_artifact", "create_experiment", "get_experiment_by_name"):
        original = getattr(MlflowClient, name)

        def wrapped(self, *args, _original=original, **kwargs):
            seen.append(threading.current_thread().name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, name, wrapped)
    return seen


class OutageDrill(Callback):
    """Stops the server after step `stop_at`, starts it again (without waiting) after `start_at`;
    a short sleep per step stretches the run over the server's restart; records step gaps."""

    def __init__(self, server: Server, stop_at: int, start_at: int | None) -> None:
        self.server, self.stop_at, self.start_at = server, stop_at, start_at
        self.gaps: dict[int, float] = {}
        self.logger = None
        self._last = None

    def on_fit_start(self, trainer) -> None:
        self.logger = next(cb for cb in trainer.callbacks if type(cb).__name__ == "MLflowLogger")

    def on_step_end(self, trainer, metrics) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.gaps[metrics.step] = now - self._last
        if metrics.step == self.stop_at:
            self.server.stop()
        if metrics.step == self.start_at:
            self.server.start(wait=False)
        time.sleep(0.03)
        self._last = time.perf_counter()


def _history(uri: str, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)


def _run_id(run_dir: Path) -> str:
    return (run_dir / "mlflow-run-id").read_text().strip()


def _same(stored: float, recorded: float) -> bool:
    """MLflow keeps NaN and stores +-inf as +-float max."""
    if math.isnan(recorded):
        return math.isnan(stored)
    if math.isinf(recorded):
        return stored == math.copysign(sys.float_info.max, recorded)
    return stored == recorded


def _check_exactly_once(uri: str, run_dir: Path, n_steps: int) -> None:
    records = {r["step"]: r for r in steps(run_dir)}
    assert sorted(records) == list(range(1, n_steps + 1))
    for key in KEYS:
        history = _history(uri, _run_id(run_dir), key)
        assert sorted(m.step for m in history) == list(range(1, n_steps + 1)), key
        assert all(_same(m.value, float(records[m.step][key])) for m in history), key
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x]
    assert sorted(m.step for m in _history(uri, _run_id(run_dir), "eval/loss")) == [e["step"] for e in evals]


def _cfg(tokenizer_dir: Path, dataset: str, run_dir: Path, *extra: str):
    return load_config(REPO / "configs" / "quickstart.yaml",
                       overrides(tokenizer_dir, dataset, run_dir, "eval.interval=100", "eval.iters=1", *extra))


@pytest.mark.slow
def test_outage_mid_run_loses_nothing_and_never_blocks_the_step_loop(
        server: Server, client_threads: list[str], tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    from mlra_mega.train.run import train

    run_dir = tmp_path / "outage"
    drill = OutageDrill(server, stop_at=20, start_at=120)
    cfg = _cfg(tokenizer_dir, sample_dataset, run_dir, "train.steps=300", f"tracking.uri={server.uri}",
               "faults.inject_nan_step=60")  # a skipped step: NaN and inf values go through too
    train(cfg, [drill], log=lambda s: None)

    assert drill.logger.outages == 1, "the server was away once"
    # The sender thread, and MLflow's system-metrics sampler with the thread that starts it: never the step loop.
    off_loop = {"mlflow-logger", "system-metrics-start", "SystemMetricsMonitor"}
    assert "mlflow-logger" in client_threads and set(client_threads) <= off_loop, \
        f"MLflow called from {sorted(set(client_threads))}: the step loop must never wait on the tracker"
    assert not (run_dir / "mlflow-buffer.jsonl").exists()
    _check_exactly_once(server.uri, run_dir, 300)
    before = statistics.median(g for s, g in drill.gaps.items() if 2 <= s < 20)
    during = statistics.median(g for s, g in drill.gaps.items() if 22 <= s < 120)
    print(f"\n[outage] median step-to-step time before the outage {before * 1e3:.1f} ms, "
          f"during it {during * 1e3:.1f} ms (the drill's 30 ms sleep not counted)")


@pytest.mark.slow
def test_server_down_at_the_end_leaves_a_buffer_that_sync_sends(
        server: Server, tmp_path: Path, tokenizer_dir: Path, sample_dataset: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    from mlra_mega.train.run import train

    if not server.up():
        server.start()
    run_dir = tmp_path / "down-at-end"
    drill = OutageDrill(server, stop_at=30, start_at=None)
    cfg = _cfg(tokenizer_dir, sample_dataset, run_dir, "train.steps=120", f"tracking.uri={server.uri}",
               "tracking.final_flush_s=2")
    train(cfg, [drill], log=lambda s: None)
    assert "unsent records are kept in" in capsys.readouterr().err
    buffered = [json.loads(x)["step"] for x in (run_dir / "mlflow-buffer.jsonl").read_text().splitlines()]
    assert buffered and max(buffered) == 120

    server.start()
    assert main(["sync-tracking", str(run_dir), "--tracking-uri", server.uri]) == 0
    _check_exactly_once(server.uri, run_dir, 120)
    assert main(["sync-tracking", str(run_dir), "--tracking-uri", server.uri]) == 0  # again: nothing new
    assert "sent 0 points" in capsys.readouterr().out
    _check_exactly_once(server.uri, run_dir, 120)


def _logger(cfg, run_dir: Path):
    from mlra_mega.config import flatten, public_dict
    from mlra_mega.tracking.mlflow import MLflowLogger

    return MLflowLogger(cfg.tracking, run_dir, params=flatten(public_dict(cfg)), runs_root=cfg.run.root,
                        zero_stage=cfg.zero.stage)


class _Unreachable:
    """An MlflowClient whose server never answers."""

    def log_batch(self, *args, **kwargs) -> None:
        raise ConnectionError("refused")


def _one_process_trainer(cfg):
    """The little of a trainer the logger reads: its step, the run's length, one main process."""
    from types import SimpleNamespace

    return SimpleNamespace(step=0, total_steps=cfg.train.steps,
                           ctx=SimpleNamespace(is_main=True, tp_size=1, pp_size=1, dp_size=1, world_size=1))


def test_the_final_flush_keeps_records_the_sender_has_in_hand(tmp_path: Path) -> None:
    """While the server is away the sender keeps taking records off the queue (its retry wait);
    the final flush must put those on disk too, before on_fit_end returns (a process may exit then)."""
    cfg = load_config(overrides=["train.steps=400", "tracking.final_flush_s=0.3"])
    logger = _logger(cfg, tmp_path)
    logger._client, logger.run_id = _Unreachable(), "run"
    trainer = _one_process_trainer(cfg)
    logger.on_fit_start(trainer)
    for step in range(1, 401):
        trainer.step = step
        logger.on_metrics(trainer, step, {"step": step, "train/loss": 1.0})
        time.sleep(0.003)
    logger.on_fit_end(trainer)
    buffered = [json.loads(x)["step"] for x in (tmp_path / "mlflow-buffer.jsonl").read_text().splitlines()]
    assert buffered == list(range(1, 401))


class _StuckThenAnswers:
    """An MlflowClient whose first request hangs until released (a server that went away
    mid-request), then succeeds."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.batches: list[list] = []

    def log_batch(self, run_id, metrics=(), **kwargs) -> None:
        self.entered.set()
        self.release.wait(30)
        self.batches.append(list(metrics))


def test_a_send_that_outlives_the_final_flush_leaves_the_buffer_to_sync(tmp_path: Path) -> None:
    """The final flush gives up on a send under way and writes the buffer; when that send returns
    later (the server came back), the sender must leave the buffer alone: it belongs to
    sync-tracking then, which may be reading it (it once deleted it under a running sync)."""
    cfg = load_config(overrides=["train.steps=5", "tracking.final_flush_s=0.3"])
    logger, client = _logger(cfg, tmp_path), _StuckThenAnswers()
    logger._client, logger.run_id = client, "run"
    trainer = _one_process_trainer(cfg)
    logger.on_fit_start(trainer)
    for step in range(1, 6):
        trainer.step = step
        logger.on_metrics(trainer, step, {"step": step, "train/loss": 1.0})
    assert client.entered.wait(10), "the sender never sent"
    sender = logger._thread
    logger.on_fit_end(trainer)
    buffer = tmp_path / "mlflow-buffer.jsonl"
    written = buffer.read_text()
    client.release.set()
    sender.join(10)
    assert not sender.is_alive() and client.batches, "the stuck send did return"
    assert buffer.read_text() == written, "the sender touched the buffer after the final flush"


class _Recorder:
    """An MlflowClient that answers at once and records the batches it is sent."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.status = None

    def log_batch(self, run_id, metrics=(), **kwargs) -> None:
        self.batches.append(list(metrics))

    def set_terminated(self, run_id, status=None) -> None:
        self.status = status

    def log_artifact(self, *args) -> None:
        pass


@pytest.mark.parametrize("interval", [0.0, 5.0])
def test_records_go_out_in_one_batch_per_send_interval(tmp_path: Path, interval: float) -> None:
    """Each send costs the step loop CPU: with an interval, one batch per interval (and one at the
    end, which does not wait for the interval); every point is sent once either way."""
    cfg = load_config(overrides=["train.steps=100", f"tracking.send_interval_s={interval}"])
    logger, client = _logger(cfg, tmp_path), _Recorder()
    logger._client, logger.run_id = client, "run"
    trainer = _one_process_trainer(cfg)
    logger.on_fit_start(trainer)
    start = time.monotonic()
    for step in range(1, 101):
        trainer.step = step
        logger.on_metrics(trainer, step, {"step": step, "train/loss": 1.0})
        if interval:
            time.sleep(0.01)
        else:  # nothing is held back: each record goes out before the next one comes (a state, not a sleep)
            deadline = time.monotonic() + 10
            while not any(m.step == step for b in client.batches for m in b) and time.monotonic() < deadline:
                time.sleep(0.002)
    logger.on_fit_end(trainer)
    assert time.monotonic() - start < (4 if interval else 30), "the end of the run must not wait out the send interval"
    assert client.status == "FINISHED"
    assert sorted(m.step for b in client.batches for m in b) == list(range(1, 101))
    if interval:
        assert len(client.batches) <= 2, len(client.batches)
    else:
        assert len(client.batches) == 100, len(client.batches)


def test_replay_sends_only_what_the_server_lacks(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from mlra_mega.tracking.mlflow import _send

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    records = [{"step": s, "ts": 1000 + s, "metrics": {"step": s, "train/loss": s / 10, "train/lr": 0.1}} for s in range(1, 11)]
    _send(client, run_id, records[:6], check_server=False)  # it landed, but the answer was lost
    assert _send(client, run_id, records, check_server=True) == 8  # 4 steps x 2 keys
    for key in ("train/loss", "train/lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, 11))


CRASH = """
import os, sys, time
from mlra_mega.config import load_config
from mlra_mega.train.callbacks import Callback
from mlra_mega.train.run import train

class Crash(Callback):
    priority = -2000  # after the writers: step 8 is written and queued for MLflow

    def on_metrics(self, trainer, step, metrics):
        if step == 8:
            time.sleep(2)  # the sender thread gets steps 6-8 out
            os._exit(1)

train(load_config(sys.argv[1], sys.argv[2:]), [Crash()], log=lambda s: None)
"""


@pytest.mark.slow
def test_steps_run_again_after_a_crash_are_tagged_and_end_with_the_resumed_values(
        tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    from mlflow.tracking import MlflowClient

    from mlra_mega.train.run import train

    run_dir = tmp_path / "crash"
    # Every record sent at once, so steps 6-8 reach the store before the crash (with the default
    # interval the last two seconds of a crashed run wait in metrics.jsonl instead).
    args = overrides(tokenizer_dir, sample_dataset, run_dir, "train.steps=10", "checkpoint.interval=5",
                     "eval.interval=0", "tracking.send_interval_s=0")
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    proc = subprocess.run([sys.executable, str(script), str(REPO / "configs" / "quickstart.yaml"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 1, proc.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert sorted(m.step for m in _history(uri, _run_id(run_dir), "train/loss")) == list(range(1, 9))

    train(load_config(REPO / "configs" / "quickstart.yaml", args), log=lambda s: None)  # resumes at 5
    run = MlflowClient(tracking_uri=uri).get_run(_run_id(run_dir))
    assert run.data.tags["replayed_steps"] == "6-8" and run.info.status == "FINISHED"
    history = _history(uri, _run_id(run_dir), "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8, 9, 10]
    last = {}
    for m in sorted(history, key=lambda m: m.timestamp):
        last[m.step] = m.value
    assert last == {r["step"]: r["train/loss"] for r in steps(run_dir)}
