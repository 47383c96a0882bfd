"""SLURM on a real one-node cluster (scripts/slurm_local.sh), through `mlra-mega submit --cpu`.

A 2-task job completes with every step in metrics.jsonl and MLflow; a job whose batch shell alone
gets the USR1 (`--batch`, as `--signal=B:USR1` sends it) checkpoints, requeues itself, resumes and
ends like the uninterrupted job; `scontrol requeue` (SIGTERM) does the same; the dry-run script
for 4 nodes x 8 GPUs has the rendezvous and resource lines. USR1 to the tasks (the template's own
`--signal`) and SIGKILL of one task are tested across two nodes (tests/test_multinode.py), which
asks more of each than one node could (both nodes stop at one step; the rank's host is named).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mlra_mega.cli import main
from tests.train.test_checkpoint import overrides, steps

REPO = Path(__file__).resolve().parent.parent
STEPS = 150
SLURM_DIR = Path(os.environ.get("MLRA_SLURM_DIR", "/tmp/mlra-slurm"))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("apt-get") is None and shutil.which("slurmctld") is None,
                                 reason="needs Slurm or apt-get to install it")]


def _running(name: str) -> bool:
    pidfile = SLURM_DIR / f"{name}.pid"
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def cluster():
    """The local cluster; stopped again afterwards when this module started it (CI starts its own)."""
    env = dict(os.environ, MLRA_SLURM_DIR=str(SLURM_DIR))
    was_up = all(_running(n) for n in ("munged", "slurmctld", "slurmd"))
    script = str(REPO / "scripts" / "slurm_local.sh")
    proc = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    os.environ["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    yield env
    if not was_up:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=120)


def submit(run_dir: Path, tokenizer_dir: Path, dataset: str, *extra: str, capsys) -> tuple[str, float]:
    args = ["submit", str(REPO / "configs" / "quickstart.yaml"), "--cpu", "--tasks-per-node", "2",
            "--cpus-per-task", "1", "--time", "00:15:00", "--signal-lead", "60",
            *overrides(tokenizer_dir, dataset, run_dir, f"train.steps={STEPS}", "eval.interval=0", *extra)]
    t0 = time.time()
    assert main(args) == 0
    out = capsys.readouterr().out
    return re.search(r"submitted job (\d+)", out).group(1), t0


def job_state(job: str) -> str | None:
    proc = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    m = re.search(r"JobState=(\w+)", proc.stdout)
    return m.group(1) if m else None


def wait_done(job: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job)
        if state in (None, "COMPLETED"):
            return
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), state
        time.sleep(0.5)
    queue = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True).stdout
    raise AssertionError(f"job {job} did not finish in {timeout}s (state {job_state(job)}); queue:\n{queue}")


def wait_steps(run_dir: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ((run_dir / "metrics.jsonl").is_file() and len(steps(run_dir)) >= n):
        assert time.time() < deadline, "the job never started training"
        time.sleep(0.2)


def batch_times(run_dir: Path) -> list[float]:
    text = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    return [float(t) for t in re.findall(r"\[batch\] job \d+ \(restart \d+\) on \S+ at ([\d.]+)", text)]


def mlflow_steps(run_dir: Path) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == run_dir.name]
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory, tokenizer_dir: Path, sample_dataset: str) -> Path:
    return tmp_path_factory.mktemp("slurm") / "straight"


def test_two_task_job_completes(cluster, reference: Path, tokenizer_dir: Path, sample_dataset: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    job, t0 = submit(reference, tokenizer_dir, sample_dataset, capsys=capsys)
    wait_done(job)
    assert [r["step"] for r in steps(reference)] == list(range(1, STEPS + 1))
    assert mlflow_steps(reference) == list(range(1, STEPS + 1))
    log = "".join(p.read_text() for p in reference.glob("slurm-*.out"))
    assert "2 processes = tensor 1 x data 2" in log
    (start,) = batch_times(reference)
    print(f"\n[slurm timing] submit-to-start {start - t0:.1f}s, total {time.time() - t0:.1f}s")


@pytest.mark.parametrize("how", ["USR1 to the batch shell", "requeue"])
def test_preempted_job_requeues_resumes_and_matches(how: str, cluster, reference: Path, tmp_path: Path,
                                                     tokenizer_dir: Path, sample_dataset: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    if not (reference / "metrics.jsonl").is_file():
        pytest.skip("the uninterrupted job did not run")
    run = tmp_path / how.replace(" ", "-")
    job, t0 = submit(run, tokenizer_dir, sample_dataset, capsys=capsys)
    wait_steps(run, 5)
    t_signal = time.time()
    if how == "USR1 to the batch shell":
        # As `#SBATCH --signal=B:USR1@T` would: the shell alone gets it and must forward it.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job], check=True)  # SIGTERM to the job, then requeued
    wait_done(job)
    records = steps(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["train/loss"] == steps(reference)[-1]["train/loss"]
    assert all(a["train/loss"] == b["train/loss"] for a, b in zip(records, steps(reference)))
    assert mlflow_steps(run) == list(range(1, STEPS + 1))
    starts = batch_times(run)
    assert len(starts) == 2, "the job ran twice: before and after the requeue"
    assert not (run / "PREEMPTED").exists()
    print(f"\n[slurm timing] {how}: submit-to-start {starts[0] - t0:.1f}s, signal-to-restart "
          f"{starts[1] - t_signal:.1f}s, total {time.time() - t0:.1f}s")


def test_sweep_submits_each_member_and_they_report_to_one_server(cluster, tmp_path: Path, tokenizer_dir: Path,
                                                                 sample_dataset: str, capsys) -> None:
    import yaml
    from mlflow.tracking import MlflowClient

    from tests.tracking.test_mlflow import Server

    server = Server(tmp_path)
    server.start()
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({
            "name": "submitted", "base": str(REPO / "configs" / "quickstart.yaml"),
            "overrides": [*overrides(tokenizer_dir, sample_dataset, tmp_path / "unused", "train.steps=20",
                                     "eval.interval=0", f"tracking.uri={server.uri}")],
            "axes": {"variant": ["vanilla", "mlra"]}, "seeds": 1}, sort_keys=False))
        assert main(["sweep", str(spec), "--submit", "--cpu", "--tasks-per-node", "1", "--cpus-per-task", "1",
                     "--time", "00:10:00"]) == 0
        jobs = sorted(set(re.findall(r"submitted job (\d+)", capsys.readouterr().out)))
        assert len(jobs) == 2
        for job in jobs:
            wait_done(job)
        client = MlflowClient(tracking_uri=server.uri)
        exp = client.get_experiment_by_name("quickstart")
        (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.sweep_parent = 'submitted'")
        children = client.search_runs([exp.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(r.info.run_name for r in children) == ["mlra-s0", "vanilla-s0"]
        for run in children:
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 21))
    finally:
        server.stop()


def test_dry_run_for_4_nodes_of_8_gpus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["submit", str(REPO / "configs" / "quickstart.yaml"), "--nodes", "4", "--gpus-per-node", "8",
                 "--partition", "gpu", "--account", "lab", "--time", "2:00:00", "--dry-run",
                 f"run.dir={tmp_path / 'run'}"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=2:00:00",
                 "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script, line
    assert f"run.dir={tmp_path / 'run'}" in script and "srun --kill-on-bad-exit=1" in script
    assert not list(tmp_path.iterdir())  # a dry run submits and writes nothing
