"""Elastic checkpoints: a TP=2 x DP=2 ZeRO-1 run stopped at step 4 and resumed on five other
layouts continues the uninterrupted run (within 1e-5, one MLflow run with every step once, the
same data positions); `mlra-mega reshard` output resumes at its TP x PP and at another; async
saves equal sync ones and a SIGKILL during one leaves the previous checkpoint in use."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlra_mega.config import load_config
from mlra_mega.train.checkpoint import find_checkpoint, is_complete, read_sidecar
from tests.train.test_checkpoint import REPO, overrides, steps

pytestmark = pytest.mark.slow  # launches processes

STEPS = 8
COMMON = ["train.steps=8", "checkpoint.interval=4", "model.hidden_dropout=0", "model.attention_dropout=0",
          "zero.stage=1", "optim.warmup_steps=2"]
# name: (processes, overrides, the line the resume prints)
TARGETS = {
    "tp1_dp4": (4, ["parallel.tensor=1"], "resharding TP2 x DP2 ZeRO-1 -> TP1 x DP4 ZeRO-1"),
    "tp4_dp1": (4, ["parallel.tensor=4"], "resharding TP2 x DP2 ZeRO-1 -> TP4 x DP1 ZeRO-1"),
    "tp2_dp1_zero3": (2, ["parallel.tensor=2", "zero.stage=3"], "resharding TP2 x DP2 ZeRO-1 -> TP2 x DP1 ZeRO-3"),
    "one_process": (1, ["parallel.tensor=1"], "resharding TP2 x DP2 ZeRO-1 -> TP1 x DP1 ZeRO-1"),
    "pp2_dp2": (4, ["parallel.tensor=1", "parallel.pipeline=2"], "resharding TP2 x DP2 ZeRO-1 -> TP1 x PP2 x DP2 ZeRO-1"),
}
REL = 1e-5


def torchrun(nproc: int, args: list[str]) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mlra_mega", "train", str(REPO / "configs" / "quickstart.yaml"), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def elastic_runs(elastic_straight: Path, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path,
                 sample_dataset: str) -> dict:
    """{"straight": run dir, "stopped": run dir at step 4, name: (run dir, its output) per target}.
    The uninterrupted run (tests/conftest.py, shared with the two-node tests) saves asynchronously:
    it must train exactly like the sync ones."""
    root = tmp_path_factory.mktemp("elastic")
    straight = elastic_straight
    stopped = root / "stopped" / "run"
    torchrun(4, overrides(tokenizer_dir, sample_dataset, stopped, *COMMON, "parallel.tensor=2", "train.stop_at=4"))
    out = {"straight": straight, "stopped": stopped}
    for name, (nproc, extra, _) in TARGETS.items():
        shutil.copytree(stopped.parent, root / name)  # the run and its MLflow store
        run = root / name / "run"
        out[name] = (run, torchrun(nproc, overrides(tokenizer_dir, sample_dataset, run, *COMMON, *extra)))
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


def test_the_async_checkpoints_of_the_straight_run_are_complete(elastic_runs) -> None:
    root = elastic_runs["straight"] / "checkpoints"
    assert is_complete(root / "step00000004") and is_complete(root / "step00000008")
    assert (root / "latest").read_text().strip() == "step00000008"
    assert not (root / "step00000004" / "parts").exists()  # the ranks' digests were merged


@pytest.mark.parametrize("name", list(TARGETS))
def test_resumed_on_another_layout_continues_the_run(name: str, elastic_runs) -> None:
    run, output = elastic_runs[name]
    assert TARGETS[name][2] in output
    assert "re-derived from (train.seed=" in output
    a, b = steps(elastic_runs["straight"]), steps(run)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["train/consumed_samples"] for r in b] == [r["train/consumed_samples"] for r in a]
    for ra, rb in zip(a[4:], b[4:]):
        for key in ("train/loss", "train/grad_norm"):
            assert _close(rb[key], ra[key]), f"{name} step {ra['step']}: {key} {rb[key]} vs {ra[key]}"
    sidecar = read_sidecar(find_checkpoint(run))
    assert sidecar["step"] == STEPS and sidecar["consumed_samples"] == a[-1]["train/consumed_samples"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_the_resumed_run_is_one_mlflow_run_with_every_step_once(name: str, elastic_runs) -> None:
    from mlflow.tracking import MlflowClient

    run, _ = elastic_runs[name]
    client = MlflowClient(tracking_uri=f"sqlite:///{run.parent.resolve() / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert mlrun.info.status == "FINISHED"
    for key in ("train/loss", "train/grad_norm"):
        got = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}
        assert len(client.get_metric_history(mlrun.info.run_id, key)) == STEPS
        assert got == {r["step"]: r[key] for r in steps(run)}, key


def _train_in_process(tokenizer_dir: Path, dataset: str, run_dir: Path, *extra: str):
    from mlra_mega.train.run import train

    said: list[str] = []
    history, _ = train(load_config(None, overrides(tokenizer_dir, dataset, run_dir, "tracking.enabled=false",
                                                   *COMMON, *extra)), log=said.append)
    return history, said


@pytest.mark.parametrize("tensor,pipeline,resume_extra", [(1, 1, ["zero.stage=0"]),
                                                           (2, 2, ["zero.stage=2"])],
                         ids=["tp1-resumed-at-zero0", "tp2xpp2-resumed-at-tp1-zero2"])
def test_reshard_offline_and_resume(tensor: int, pipeline: int, resume_extra: list[str], elastic_runs,
                                    tmp_path: Path, tokenizer_dir: Path, sample_dataset: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from mlra_mega.cli import main

    out = tmp_path / "resharded"
    assert main(["reshard", str(elastic_runs["stopped"]), str(out), "--tensor", str(tensor),
                 "--pipeline", str(pipeline)]) == 0
    assert f"TP{tensor}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "elastic").iterdir()) == [
        f"tp{t:02d}-pp{s:02d}.pt" for t in range(tensor) for s in range(pipeline)]
    assert is_complete(out, verify_hashes=True)
    history, said = _train_in_process(tokenizer_dir, sample_dataset, tmp_path / "run", "parallel.tensor=1",
                                      f"checkpoint.resume={out}", *resume_extra)
    assert any(f"resharding TP{tensor} " in line and "(resharded) -> TP1 x DP1" in line for line in said), said
    straight = steps(elastic_runs["straight"])
    assert [m.step for m in history] == [5, 6, 7, 8]
    for m, r in zip(history, straight[4:]):
        assert _close(m.loss, r["train/loss"]) and _close(m.grad_norm, r["train/grad_norm"]), (m.step, m.loss, r["train/loss"])


def test_reshard_refuses_what_it_cannot_do(elastic_runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlra_mega.cli import main

    assert main(["reshard", str(elastic_runs["stopped"]), str(tmp_path / "a"), "--tensor", "3"]) == 2
    assert "parallel.tensor: 3 does not divide model.num_heads" in capsys.readouterr().err
    assert main(["reshard", str(elastic_runs["stopped"]), str(tmp_path / "b"), "--tensor", "1", "--pipeline",
                 "3"]) == 2
    assert "parallel.pipeline: 3 stages do not split model.num_layers=2" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture
def one_thread():
    """The killed run is a process with OMP_NUM_THREADS=1; the in-process runs compared with it bit
    for bit must use one thread too (a reduction split over two threads rounds differently)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_sigkill_during_an_async_save_resumes_from_the_previous_checkpoint(
        tmp_path: Path, tokenizer_dir: Path, sample_dataset: str, one_thread) -> None:
    extra = ["tracking.enabled=false", "train.steps=12", "checkpoint.async=true", "parallel.tensor=1"]
    straight_history, _ = _train_in_process(tokenizer_dir, sample_dataset, tmp_path / "straight", *extra)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlra_mega", "train", str(REPO / "configs" / "quickstart.yaml"),
           *overrides(tokenizer_dir, sample_dataset, run, *COMMON, *extra, "faults.kill_in_save_step=8")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step00000004"
    assert (root / "step00000008").is_dir() and not (root / "step00000008" / "manifest.json").exists()
    assert find_checkpoint(run).tag == "step00000004"
    history, said = _train_in_process(tokenizer_dir, sample_dataset, run, *extra)
    assert [m.step for m in history] == list(range(5, 13))
    assert [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in steps(run)] == [
        (m.step, m.loss, m.grad_norm) for m in straight_history]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000008", "step00000012"]
    assert all(is_complete(root / t) for t in ("step00000008", "step00000012"))

