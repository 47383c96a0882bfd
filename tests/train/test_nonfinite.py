"""Non-finite steps: NaN poisoned into one rank's gradients at step 3 of a 2-rank run is skipped on
both ranks at every ZeRO stage (parameters bit-for-bit those of step 2, the schedule goes on), is
counted, and with rollback enabled a persistent run of them sends the run back to its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlra_mega.config import ConfigError, load_config
from mlra_mega.train.callbacks import Callback
from mlra_mega.train.checkpoint import model_shard
from mlra_mega.train.nonfinite import NanDrill, drill_from
from tests.conftest import TrainData, train_data
from tests.dist import dist_case, dist_result

pytestmark = pytest.mark.slow  # every test here launches processes

STAGES = {"zero0": ["zero.stage=0"], "zero1": ["zero.stage=1"], "zero2": ["zero.stage=2"],
          "zero3": ["zero.stage=3"], "zero1_bf16": ["zero.stage=1", "train.precision=bf16"]}
BASE = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "optim.lr=1e-3", "optim.warmup_steps=0",
        "eval.interval=0", "tracking.enabled=false", "checkpoint.keep=20"]


@pytest.fixture(scope="module")
def data(tokenizer_dir: Path, sample_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return train_data(tokenizer_dir, sample_dataset, tmp_path_factory, "nonfinite")


def _run(data: TrainData, name: str, extra: list[str], callbacks=()) -> tuple[list, Path, list[str]]:
    import torch.distributed as dist

    from mlra_mega.train.run import train

    run_dir = Path(data.runs) / name
    cfg = load_config(None, [*BASE, *data.overrides(), f"run.dir={run_dir}", *extra])
    lines: list[str] = []
    history, _ = train(cfg, callbacks, log=lines.append)
    dist.barrier()
    return history, run_dir, lines


class _Params(Callback):
    """Every step's whole parameters (gathered at ZeRO-3)."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, trainer, metrics) -> None:
        self.by_step[metrics.step] = model_shard(trainer.engine)
        self.watch = trainer.step_object.watch


@dist_case(2)
def skip_at_every_stage(data: TrainData) -> dict:
    out = {}
    for name, extra in STAGES.items():
        params = _Params()
        history, run_dir, lines = _run(data, name, [*extra, "train.steps=4", "faults.inject_nan_step=3",
                                              "faults.inject_nan_rank=1"], [params])
        p2, p3, p4 = (params.by_step[s] for s in (2, 3, 4))
        out[name] = {"unchanged_by_3": all(torch.equal(p2[k], p3[k]) for k in p2),
                     "moved_by_4": any(not torch.equal(p3[k], p4[k]) for k in p3),
                     "skipped": [m.skipped for m in history], "skipped_steps": [m.skipped_steps for m in history],
                     "lr": [m.lr for m in history], "loss": [m.loss for m in history],
                     "grad_norm_3": history[2].grad_norm, "lines": lines, "watch": params.watch,
                     "file": [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]}
    return out


@dist_case(2)
def clean_reference(data: TrainData) -> dict:
    history, _, _ = _run(data, "clean", ["zero.stage=1", "train.steps=4"])
    return {"lr": [m.lr for m in history], "loss": [m.loss for m in history]}


@dist_case(2)
def rollback(data: TrainData) -> dict:
    # Checkpoints every 2 steps but not on a skipped one; 5 and 6 poisoned: two skips in a row -> back to 4.
    history, run_dir, lines = _run(data, "rollback", ["zero.stage=2", "train.steps=8", "checkpoint.interval=2",
                                                "train.max_consecutive_skips=2", "faults.inject_nan_step=5",
                                                "faults.inject_nan_count=2", "faults.inject_nan_rank=0"])
    return {"steps": [m.step for m in history], "loss": [m.loss for m in history],
            "consumed": [m.consumed_samples for m in history], "lines": lines,
            "file": [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()],
            "sidecar_rollbacks": torch.load(run_dir / "checkpoints" / "step00000008" / "sidecar.pt",
                                            weights_only=True)["nonfinite"]}


@dist_case(2)
def rollback_without_checkpoint(data: TrainData) -> str:
    from mlra_mega.errors import MlraMegaError

    try:
        _run(data, "no_ckpt", ["train.steps=6", "train.max_consecutive_skips=1", "faults.inject_nan_step=2"])
    except MlraMegaError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("stage", list(STAGES))
def test_poisoned_step_is_skipped_on_every_rank(stage: str, data: TrainData) -> None:
    (clean, _) = dist_result(__name__, 2, "clean_reference", data=data)
    for rank, runs in enumerate(dist_result(__name__, 2, "skip_at_every_stage", data=data)):
        run = runs[stage]
        assert run["watch"] == {"zero2": "hooks", "zero3": "hooks"}.get(stage, "step")
        assert run["unchanged_by_3"], "the skipped step changed the parameters"
        assert run["moved_by_4"], "training did not go on after the skipped step"
        assert run["skipped"] == [None, None, 1, None] and run["skipped_steps"] == [0, 0, 1, 1]
        assert run["lr"] == clean["lr"], "the schedule must advance through a skipped step"
        assert not torch.isfinite(torch.tensor(run["grad_norm_3"]))
        assert all(torch.isfinite(torch.tensor(run["loss"])))  # the poison was in the gradients only
        if stage == "zero1":
            assert run["loss"][:3] == clean["loss"][:3]  # same weights until the skip
        if rank == 0:
            assert any("step 3: non-finite loss or gradient on rank(s) 1" in line for line in run["lines"])
            assert [r.get("train/skipped") for r in run["file"]] == [None, None, 1, None]


@pytest.mark.parametrize("stage", list(STAGES))
def test_one_rank_skips_a_poisoned_step_by_the_gradient_norm(stage: str, data: TrainData) -> None:
    """One process in fp32 reads no gradient itself: the step's norm decides (DeepSpeed's skip at
    ZeRO 1-3, the step's own norm at ZeRO-0); bf16 sums its accumulated gradients once per step.
    Either way the update is skipped, the schedule goes on and the log names rank 0."""
    from mlra_mega.train.run import train

    params = _Params()
    lines: list[str] = []
    cfg = load_config(None, [*BASE, *data.overrides(), f"run.dir={Path(data.runs) / ('one-' + stage)}",
                             *STAGES[stage], "train.steps=4", "faults.inject_nan_step=3", "faults.inject_nan_rank=0"])
    history, _ = train(cfg, [params], log=lines.append)
    p2, p3, p4 = (params.by_step[s] for s in (2, 3, 4))
    assert all(torch.equal(p2[k], p3[k]) for k in p2), "the skipped step changed the parameters"
    assert any(not torch.equal(p3[k], p4[k]) for k in p3), "training did not go on after the skipped step"
    assert [m.skipped for m in history] == [None, None, 1, None]
    assert not torch.isfinite(torch.tensor(history[2].grad_norm))
    assert all(torch.isfinite(torch.tensor([m.loss for m in history])))
    assert any("step 3: non-finite loss or gradient on rank(s) 0;" in line for line in lines), lines
    assert params.watch == ("step" if "bf16" in stage else "norm")


def test_rollback_after_consecutive_skips_recovers(data: TrainData) -> None:
    for out in dist_result(__name__, 2, "rollback", data=data):
        # 1..6 (5 and 6 skipped), back to 4, then 5..8 again on fresh batches.
        assert out["steps"] == [1, 2, 3, 4, 5, 6, 7, 8]
        assert out["consumed"] == [8 * s for s in (1, 2, 3, 4, 7, 8, 9, 10)]
        assert all(torch.isfinite(torch.tensor(out["loss"])))
        assert out["sidecar_rollbacks"] == {"skipped_total": 2, "rollbacks": 1}
    main = dist_result(__name__, 2, "rollback", data=data)[0]
    assert main["file"] == [1, 2, 3, 4, 5, 6, 7, 8], "metrics.jsonl keeps each step once, the redone ones"
    assert any("rolled back from step 6" in line and "step00000004" in line for line in main["lines"])


def test_rollback_without_a_checkpoint_says_what_to_do(data: TrainData) -> None:
    for message in dist_result(__name__, 2, "rollback_without_checkpoint", data=data):
        assert "no checkpoint to roll back to" in message and "checkpoint.interval" in message


def test_drill_from_config_and_environment() -> None:
    cfg = load_config(None, ["faults.inject_nan_step=7", "faults.inject_nan_rank=3"])
    assert drill_from(cfg.faults, {}) == NanDrill(7, 3, 1)
    assert drill_from(cfg.faults, {"MLRA_INJECT_NAN": "5:1:2"}) == NanDrill(5, 1, 2)
    assert drill_from(load_config(None, []).faults, {}) is None
    for bad in ("x", "0", "3:1:0", "1:2:3:4"):
        with pytest.raises(ConfigError, match="MLRA_INJECT_NAN"):
            drill_from(cfg.faults, {"MLRA_INJECT_NAN": bad})
    with pytest.raises(ConfigError, match="train.max_consecutive_skips"):
        load_config(None, ["train.max_consecutive_skips=-1"])

