"""The run-directory lock: refuses a live holder, never blocks a legitimate restart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mlra_mega.errors import ConfigError
from mlra_mega.train.run_lock import LOCK, RunLock


def hold(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": None, "renewed": time.time(), **fields}
    (run_dir / LOCK).write_text(json.dumps(record))


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_fresh_directory_is_taken_and_released(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run", stale_s=60, log=lambda s: None) as lock:
        held = json.loads(lock.path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert not (tmp_path / "run" / LOCK).exists()


def test_a_live_holder_on_this_host_is_refused(tmp_path: Path, live_pid: int, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    hold(tmp_path, pid=live_pid, slurm_job_id="123")
    with pytest.raises(ConfigError, match=rf"in use by another run \(host {socket.gethostname()}, pid {live_pid}, "
                                          r"Slurm job 123"):
        RunLock(tmp_path, stale_s=60).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == live_pid


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    hold(tmp_path, pid=proc.pid)
    notes: list[str] = []
    lock = RunLock(tmp_path, stale_s=3600, log=notes.append)
    lock.acquire()
    lock.release()
    assert "no longer running" in notes[0]


def test_another_host_is_judged_by_its_lease_not_its_pid(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    hold(tmp_path, host="node-b", pid=1)  # pid 1 is alive here, and means nothing for node-b
    with pytest.raises(ConfigError, match="host node-b"):
        RunLock(tmp_path, stale_s=60).acquire()
    hold(tmp_path, host="node-b", pid=999_999_999, renewed=time.time() - 120)  # stopped renewing 2 min ago
    notes: list[str] = []
    lock = RunLock(tmp_path, stale_s=60, log=notes.append)
    lock.acquire()
    lock.release()
    assert "has not renewed it for 120s" in notes[0]


def test_a_requeued_slurm_job_takes_its_own_lock_from_any_host(tmp_path: Path, live_pid: int, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    hold(tmp_path, host="node-a", pid=live_pid, slurm_job_id="4242")
    notes: list[str] = []
    lock = RunLock(tmp_path, stale_s=3600, log=notes.append)
    lock.acquire()
    assert "requeued" in notes[0] and json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_the_lease_is_renewed_while_held(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, stale_s=0.4)  # renews every 0.1 s
    lock.acquire()
    try:
        first = json.loads(lock.path.read_text())["renewed"]
        time.sleep(0.5)
        assert json.loads(lock.path.read_text())["renewed"] > first
    finally:
        lock.release()


def test_release_leaves_a_lock_taken_over_by_another_job(tmp_path: Path, live_pid: int) -> None:
    lock = RunLock(tmp_path, stale_s=60)
    lock.acquire()
    hold(tmp_path, host="node-c", pid=live_pid)  # judged dead and taken over meanwhile
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "node-c"
