"""The schedule on resume is a function of the config and the step: a run extended (train.steps
4 -> 8) or given another optim.lr follows the new config's schedule from the resumed step, says so
in one line, and records the change in config_changes.jsonl and in MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mlra_mega.cli import main
from mlra_mega.config import load_config
from mlra_mega.train.engine import lr_factor
from tests.conftest import tiny_train_argv

COMMON = ["optim.lr=1e-3", "optim.warmup_steps=2", "optim.schedule=cosine", "optim.min_lr=1e-4"]


def lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, sample_dataset: str):
    root = tmp_path_factory.mktemp("schedule")
    straight, extended, relr = root / "straight", root / "extended", root / "relr"
    assert main(tiny_train_argv(tokenizer_dir, sample_dataset, straight, "train.steps=8", *COMMON)) == 0
    for run in (extended, relr):
        assert main(tiny_train_argv(tokenizer_dir, sample_dataset, run, "train.steps=4", *COMMON,
                                    "tracking.enabled=true")) == 0
    return root, straight, extended, relr


def test_an_extended_run_follows_the_new_schedule_and_says_so(runs, tokenizer_dir: Path, sample_dataset: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    root, straight, extended, _ = runs
    capsys.readouterr()
    assert main(tiny_train_argv(tokenizer_dir, sample_dataset, extended, "train.steps=8", *COMMON,
                                "tracking.enabled=true")) == 0
    out = capsys.readouterr().out
    got, want = lrs(extended), lrs(straight)
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == want[step], f"step {step}: lr {got[step]} != the straight 8-step run's {want[step]}"
    notices = [line for line in out.splitlines() if "with changed settings" in line]
    assert len(notices) == 1 and "train.steps 4 -> 8" in notices[0] and "resumed at step 4" in notices[0]
    (record,) = [json.loads(x) for x in (extended / "config_changes.jsonl").read_text().splitlines()]
    assert record["step"] == 4 and record["changes"]["train.steps"] == [4, 8]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root.resolve() / 'mlflow.db'}")
    run_id = (extended / "mlflow-run-id").read_text().strip()
    assert json.loads(client.get_run(run_id).data.tags["config_changes"])["changes"]["train.steps"] == [4, 8]


def test_a_changed_lr_on_resume_takes_effect(runs, tokenizer_dir: Path, sample_dataset: str) -> None:
    _, _, _, relr = runs
    assert main(tiny_train_argv(tokenizer_dir, sample_dataset, relr, "train.steps=8", *COMMON[1:],
                                "optim.lr=3e-3", "tracking.enabled=true")) == 0
    optim = load_config(None, ["optim.lr=3e-3", *COMMON[1:]]).optim
    got = lrs(relr)
    for step in range(5, 9):
        assert math.isclose(got[step], 3e-3 * lr_factor(step - 1, optim, 8), rel_tol=1e-12), step
    changes = json.loads((relr / "config_changes.jsonl").read_text().splitlines()[-1])["changes"]
    assert changes["optim.lr"] == [1e-3, 3e-3] and changes["train.steps"] == [4, 8]
