"""The trainer's bookkeeping: a user callback's metric reaches every writer, callbacks run by
priority, the step counter is the step being made, a stop is a request, states have stable names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlra_mega.config import load_config
from mlra_mega.train.callbacks import Callback, Priority
from mlra_mega.train.run import train
from tests.conftest import tiny_train_argv


class UserMetric(Callback):
    """Records `user/answer` each step, looks at what the diagnostics recorded before it, and
    asks for a stop after `stop_after` steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.seen: dict[str, list[int]] = {"start": [], "before_optimizer": [], "end": []}
        self.diagnostics_seen: list[bool] = []
        self.order: list[str] = []

    def on_fit_start(self, trainer) -> None:
        self.order = [cb.state_key for cb in trainer.callbacks]

    def on_step_start(self, trainer) -> None:
        self.seen["start"].append(trainer.step)

    def on_before_optimizer_step(self, trainer) -> None:
        self.seen["before_optimizer"].append(trainer.step)

    def on_step_end(self, trainer, metrics) -> None:
        assert metrics.step == trainer.step
        self.seen["end"].append(trainer.step)
        self.diagnostics_seen.append("stability/resid_var/layer_00" in trainer.metrics)  # diagnostics run first
        trainer.record_metric("user/answer", 40.0 + trainer.step)
        if trainer.step == self.stop_after:
            trainer.request_stop("the user callback has seen enough")


def _cfg(tokenizer_dir: Path, dataset: str, run_dir: Path, *extra: str):
    argv = tiny_train_argv(tokenizer_dir, dataset, run_dir, *extra)
    return load_config(argv[1], argv[2:])


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, sample_dataset: str):
    run_dir = tmp_path_factory.mktemp("trainer") / "run"
    user = UserMetric(stop_after=3)
    said: list[str] = []
    cfg = _cfg(tokenizer_dir, sample_dataset, run_dir, "train.steps=5", "tracking.enabled=true",
               "tracking.send_interval_s=0", "diagnostics.interval=1", "checkpoint.interval=0")
    history, _ = train(cfg, [user], log=said.append)
    return run_dir, user, history, said


def test_a_user_callbacks_metric_reaches_metrics_jsonl_and_mlflow(tracked_run) -> None:
    from mlflow.tracking import MlflowClient

    from mlra_mega.tracking.mlflow import RUN_ID_FILE

    run_dir, _, history, _ = tracked_run
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["user/answer"] for r in rows] == [41.0, 42.0, 43.0]
    assert [m.extra["user/answer"] for m in history] == [41.0, 42.0, 43.0]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "user/answer")}
    assert logged == {1: 41.0, 2: 42.0, 3: 43.0}
    # The same values in both: the writers get the step's metrics once, after every callback.
    assert {m.step: m.value for m in client.get_metric_history(run_id, "stability/resid_var/layer_01")} == {
        r["step"]: r["stability/resid_var/layer_01"] for r in rows}


def test_the_step_counter_is_the_step_being_made_and_a_stop_is_a_request(tracked_run) -> None:
    run_dir, user, history, said = tracked_run
    assert user.seen == {"start": [1, 2, 3], "before_optimizer": [1, 2, 3], "end": [1, 2, 3]}
    assert [m.step for m in history] == [1, 2, 3]
    assert any("the user callback has seen enough" in s for s in said)
    # ZeRO-1 (the default) on one process: the trainer says what it costs and what to pick.
    assert any("ZeRO-1 over one data-parallel rank" in s and "zero.stage=0" in s for s in said)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final"]["user/answer"] == 43.0
    # A stop is not a failure: the checkpoint of the stop step is the last one (train.steps not reached).
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000003"


def test_callbacks_run_by_declared_priority(tracked_run) -> None:
    _, user, _, _ = tracked_run
    order = user.order
    assert order[:2] == ["watchdog", "profiler"]
    assert order.index("residual_probe") < order.index("UserMetric") < order.index("checkpointer")
    assert order.index("checkpointer") < order.index("preemption") < order.index("metrics_file")
    assert set(order[-4:]) == {"console", "metrics_file", "summary", "mlflow"}
    assert all(user.diagnostics_seen)


def test_callback_states_are_keyed_by_name_and_two_of_one_name_are_refused() -> None:
    from types import SimpleNamespace

    from mlra_mega.train.trainer import Trainer

    class Mine(Callback):
        name = "mine"
        priority = Priority.USER

    assert Mine().state_key == "mine" and Callback().state_key == "Callback"
    with pytest.raises(ValueError, match="share the state name 'mine'"):
        Trainer(SimpleNamespace(), SimpleNamespace(module=None), None, train=None, optim=None, model=None,
                metrics=None, evaluation=None, callbacks=[Mine(), Mine()])
