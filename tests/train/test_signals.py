"""Preemption: a signal on any rank -> all ranks stop at one step, save, write PREEMPTED, exit 0;
the resumed run ends where an uninterrupted one does, with the same numbers (shown after SIGUSR1;
SIGTERM writes the same checkpoint). Dead ranks: SIGKILL of one rank ends the job within 60 s
naming it (torchrun, the deepspeed launcher) and the restart matches the uninterrupted run (shown
under torchrun); a signalled rank does not wait long for a silent peer."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from mlra_mega.train.signals import PREEMPTED, PreemptionGuard, install_handlers, restore_handlers
from tests.dist import dist_case, dist_result
from tests.train.test_checkpoint import overrides, steps

pytestmark = pytest.mark.slow  # every test here launches processes

REPO = Path(__file__).resolve().parents[2]
STEPS = 150
KEYS = ("train/loss", "train/lr", "train/grad_norm", "train/consumed_samples")


def launch(args: list[str], launcher: str = "torchrun") -> subprocess.Popen:
    config = str(REPO / "configs" / "quickstart.yaml")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "--max-restarts=0", "-m", "mlra_mega", "train", config, *args]
    else:
        cmd = ["deepspeed", "--num_gpus", "2", str(REPO / "launchers" / "train.py"), config, *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ((run_dir / "metrics.jsonl").is_file() and len(steps(run_dir)) >= n):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout: float = 300, check: bool = True) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 or not check, out[-4000:]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, sample_dataset: str) -> Path:
    run = tmp_path_factory.mktemp("sig") / "straight"
    finish(launch(overrides(tokenizer_dir, sample_dataset, run, f"train.steps={STEPS}", "tracking.enabled=false")))
    return run


@pytest.mark.parametrize("how", ["SIGUSR1 to one worker", "SIGTERM to the torchrun agent"])
def test_signal_saves_marks_and_the_resumed_run_matches(how: str, straight: Path, tmp_path: Path,
                                                        tokenizer_dir: Path, sample_dataset: str) -> None:
    run = tmp_path / "run"
    args = overrides(tokenizer_dir, sample_dataset, run, f"train.steps={STEPS}", "tracking.enabled=false")
    proc = launch(args)
    wait_for_steps(run, 5, proc)
    if how.startswith("SIGUSR1"):
        # torchrun's agent does not forward USR1; Slurm's --signal=USR1 reaches each task. One is enough.
        # The agent's own children are the ranks (theirs are DataLoader workers, which ignore USR1).
        workers = psutil.Process(proc.pid).children()
        os.kill(workers[-1].pid, signal.SIGUSR1)
    else:
        os.kill(proc.pid, signal.SIGTERM)  # the agent forwards TERM to its workers
    # The workers end cleanly; an agent that got SIGTERM still exits 1 (its own SignalException):
    # statuses do not survive torchrun, which is why the marker is the signal to requeue.
    out = finish(proc, timeout=120, check=how.startswith("SIGUSR1"))
    marker = json.loads((run / PREEMPTED).read_text())
    stopped = marker["step"]
    assert marker["saved"] and marker["signal"] == how.split()[0] and 5 <= stopped < STEPS, out[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{stopped:08d}"
    assert [r["step"] for r in steps(run)] == list(range(1, stopped + 1))
    if not how.startswith("SIGUSR1"):
        return  # the resume from a preemption checkpoint is the same whatever signal made it: shown once

    finish(launch(args))  # the requeued job: resume auto from the same run.dir
    assert not (run / PREEMPTED).exists()
    resumed, reference = steps(run), steps(straight)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        assert all(a[k] == b[k] for k in KEYS), a["step"]


class _Saver:
    def __init__(self, last_save_s: float | None) -> None:
        self.last, self.last_save_s, self.saves = None, last_save_s, 0

    def save(self, trainer) -> None:
        self.saves += 1
        self.last = SimpleNamespace(tag=f"step{trainer.step:08d}", path=Path("ckpt"))


def _trainer() -> SimpleNamespace:
    import torch

    trainer = SimpleNamespace(step=7, ctx=SimpleNamespace(device=torch.device("cpu"), is_main=True), stop_reason=None)
    trainer.request_stop = lambda reason: setattr(trainer, "stop_reason", reason)
    return trainer


def test_sigterm_skips_a_save_that_cannot_finish_in_time(tmp_path: Path) -> None:
    previous = install_handlers()
    try:
        guard = PreemptionGuard(tmp_path, _Saver(last_save_s=45.0), sigterm_save_s=20.0)
        calm = _trainer()
        guard.on_step_end(calm, None)  # no signal: nothing happens
        assert calm.stop_reason is None
        os.kill(os.getpid(), signal.SIGTERM)
        trainer = _trainer()
        guard.on_step_end(trainer, None)
        assert trainer.stop_reason == "preempted by SIGTERM after step 7 (not saved)"
        assert guard.checkpointer.saves == 0
        assert json.loads((tmp_path / PREEMPTED).read_text())["saved"] is False

        install_handlers()
        fast = PreemptionGuard(tmp_path, _Saver(last_save_s=3.0), sigterm_save_s=20.0)
        os.kill(os.getpid(), signal.SIGTERM)
        trainer = _trainer()
        fast.on_step_end(trainer, None)
        assert trainer.stop_reason == "preempted by SIGTERM after step 7 (saved)" and fast.checkpointer.saves == 1
    finally:
        restore_handlers(previous)


def rank_process(proc: subprocess.Popen, rank: int) -> psutil.Process:
    """The worker process of `rank` under the launcher `proc`."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
            if child.environ().get("RANK") == str(rank) and ("train" in cmd or str(REPO / "launchers" / "train.py") in cmd):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigkill_of_one_rank_ends_the_job_naming_it_and_the_restart_matches(
        launcher: str, straight: Path, tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    run = tmp_path / "run"
    args = overrides(tokenizer_dir, sample_dataset, run, f"train.steps={STEPS}", "tracking.enabled=false",
                     "checkpoint.interval=20")
    proc = launch(args, launcher)
    wait_for_steps(run, 50, proc)
    victim = rank_process(proc, 1)
    t_kill = time.time()
    victim.kill()
    out = finish(proc, timeout=120, check=False)
    kill_to_exit = time.time() - t_kill
    assert proc.returncode != 0 and kill_to_exit < 60, out[-3000:]
    assert f"rank 0: lost rank(s) 1 ({socket.gethostname()}) during step" in out, out[-3000:]  # the survivor names it
    if launcher == "torchrun":  # and so does the launcher
        assert re.search(r"Root Cause.*?rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9", out, re.S), out[-3000:]
    else:
        assert re.search(r"--local_rank=1.*exits with return code = -9", out), out[-3000:]
    print(f"\n[dead rank] {launcher}: SIGKILL of rank 1 to the launcher's exit {kill_to_exit:.2f}s")
    killed_at = len(steps(run))
    if launcher != "torchrun":
        return  # the restart resumes the same checkpoints whichever launcher lost the rank: shown once

    finish(launch(args))  # the restart: resume auto from the newest complete checkpoint
    resumed, reference = steps(run), steps(straight)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), f"killed after {killed_at} steps"
    for a, b in zip(resumed, reference):
        assert all(a[k] == b[k] for k in KEYS), a["step"]


class _Exited(Exception):
    pass


@dist_case(2)
def signalled_rank_with_a_silent_peer() -> dict:
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(12)  # silent: in neither the agreement nor the roll call for a while
        dist.all_reduce(torch.zeros(1, dtype=torch.int32), op=dist.ReduceOp.MAX)  # meets rank 0's abandoned one
        return {}
    saver = _Saver(last_save_s=1.0)
    guard = PreemptionGuard(Path(os.environ.get("TMPDIR", "/tmp")), saver, sigterm_save_s=20.0, peer_timeout_s=2.0)
    real_exit, real_stderr, code = os._exit, sys.stderr, None
    previous = install_handlers()

    def fake_exit(status: int) -> None:
        raise _Exited(status)

    os._exit, sys.stderr = fake_exit, io.StringIO()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # what a launcher sends the survivors
        start = time.monotonic()
        try:
            guard.on_step_end(_trainer(), None)
        except _Exited as exc:
            code = exc.args[0]
        elapsed, message = time.monotonic() - start, sys.stderr.getvalue()
    finally:
        os._exit, sys.stderr = real_exit, real_stderr
        restore_handlers(previous)
    return {"code": code, "elapsed": elapsed, "saves": saver.saves, "message": message}


def test_a_signalled_rank_gives_up_on_a_silent_peer_without_saving() -> None:
    out = dist_result(__name__, 2, "signalled_rank_with_a_silent_peer")[0]
    assert out["code"] == 1 and out["saves"] == 0, out
    # 2 s for the agreement, up to 5 s for the roll call, well inside a launcher's kill delay.
    assert out["elapsed"] < 10, out
    assert "SIGTERM after step 7, but rank(s) 1 did not answer within faults.peer_timeout_s=2s" in out["message"]
