"""Per-rank logs and stack dumps: everything a rank writes (Python and C level) reaches both the
console and its log file; SIGUSR2, `mlra-mega stacks` and the watchdog put every thread's stack
in the log (the hang drill shows it in a job); a 2-rank job leaves one log per rank."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from mlra_mega.cli import main
from mlra_mega.train.rank_logs import RankLog, Watchdog, log_paths
from tests.train.test_checkpoint import overrides
from tests.train.test_signals import finish, launch, wait_for_steps


def test_rank_log_copies_both_descriptors(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Written to the descriptors, as a C library does (Python prints: the 2-rank job below).
    with RankLog(tmp_path, 3, "torchrun") as log:
        os.write(1, b"to stdout\n")
        os.write(2, b"to stderr\n")
    text = log.path.read_text()
    assert "to stdout" in text and "to stderr" in text and "==== rank 3 pid" in text
    console = capfd.readouterr()
    assert "to stdout" in console.out and "to stderr" in console.err  # the console still gets both
    card = json.loads(log_paths(tmp_path, 3)[1].read_text())
    assert card["pid"] == os.getpid() and card["log"] == str(log.path)
    os.write(1, b"after close\n")  # descriptors are back: not in the log any more
    assert "after close" not in log.path.read_text()


def _waits_for_a_dump(path: Path, marker: str, seconds: float = 10) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline:
        text = path.read_text() if path.is_file() else ""  # a rank that has not started yet
        if marker in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{marker!r} not in {path}:\n{path.read_text()[-2000:] if path.is_file() else 'no log'}")


def test_dump_signal_writes_every_thread_stack(tmp_path: Path) -> None:
    with RankLog(tmp_path, 0) as log:
        os.kill(os.getpid(), signal.SIGUSR2)
        text = _waits_for_a_dump(log.path, "test_dump_signal_writes_every_thread_stack")
    assert "rank-log-" in text or "Thread 0x" in text  # the other threads are in it too


def test_watchdog_dumps_after_a_silent_stretch_and_rearms(tmp_path: Path) -> None:
    with RankLog(tmp_path, 0) as log:
        dog = Watchdog(minutes=1.0 / 60, log=log)  # one second
        dog.on_fit_start(None)
        for _ in range(4):  # steps finishing every 0.3 s keep it quiet
            time.sleep(0.3)
            dog.on_step_end(None, None)
        assert "Timeout" not in log.path.read_text()
        text = _waits_for_a_dump(log.path, "Timeout (0:00:01)!", seconds=5)
        dog.on_fit_end(None)
    assert "test_watchdog_dumps_after_a_silent_stretch_and_rearms" in text


@pytest.mark.slow
def test_two_rank_job_has_a_log_per_rank_and_stacks_on_demand(tmp_path: Path, tokenizer_dir: Path,
                                                              sample_dataset: str, capsys) -> None:
    run = tmp_path / "run"
    # The hang drill: rank 0 stalls 4 s in step 5; the watchdog (1.2 s) dumps every rank's stacks.
    proc = launch(overrides(tokenizer_dir, sample_dataset, run, "train.steps=300", "tracking.enabled=false",
                            "faults.watchdog_minutes=0.02", "faults.inject_hang_step=5", "faults.inject_hang_s=4"))
    for rank in (0, 1):
        dump = _waits_for_a_dump(log_paths(run, rank)[0], "Timeout (0:00:01", seconds=120)
        assert "Thread 0x" in dump or "Current thread" in dump
    assert "on_before_optimizer_step" in log_paths(run, 0)[0].read_text()  # rank 0's stack: in the drill
    wait_for_steps(run, 20, proc)
    assert main(["stacks", str(run)]) == 0
    said = capsys.readouterr().out
    assert "rank 0: stacks written to" in said and "rank 1: stacks written to" in said
    for rank in (0, 1):
        _waits_for_a_dump(log_paths(run, rank)[0], "train_step")
    finish(proc)
    rank0, rank1 = (log_paths(run, r)[0].read_text() for r in (0, 1))
    assert "[train] run dir" in rank0 and "step    300/300" in rank0
    assert "==== rank 1 pid" in rank1 and "[train] run dir" not in rank1  # rank 1's own output only


def test_without_the_drill_the_watchdog_writes_nothing(tmp_path: Path, tokenizer_dir: Path,
                                                      sample_dataset: str) -> None:
    from tests.conftest import tiny_train_argv

    run = tmp_path / "run"
    assert main(tiny_train_argv(tokenizer_dir, sample_dataset, run, "train.steps=20",
                                "faults.watchdog_minutes=0.05")) == 0  # 3 s: each step takes far less
    assert "Timeout" not in log_paths(run, 0)[0].read_text()


def test_stacks_without_logs_says_what_to_give(tmp_path: Path, capsys) -> None:
    assert main(["stacks", str(tmp_path)]) == 2
    assert "has no logs/rank*.json" in capsys.readouterr().err
