"""Stability diagnostics: a TP=2 run (plain, sequence parallel, recomputing activations) and DP=2 runs
report the per-layer norms, residual variances and gradient variances of one process on the same
batches; the gradient variance equals its definition computed from every micro-batch's own
gradient; callback states reach the checkpoint; ZeRO-2 is refused for the gradient variance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlra_mega.config import ConfigError, load_config
from mlra_mega.train.callbacks import Callback
from tests.conftest import TrainData, train_data
from tests.dist import dist_case, dist_result

pytestmark = pytest.mark.slow  # every test here launches processes

BASE = ["model.num_layers=3", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=32",
        "model.attention=mlra", "train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=2",
        "optim.lr=1e-3", "eval.interval=0", "tracking.enabled=false", "diagnostics.interval=2"]
REL = 1e-5


@pytest.fixture(scope="module")
def data(tokenizer_dir: Path, sample_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return train_data(tokenizer_dir, sample_dataset, tmp_path_factory, "stability")


def _run(data: TrainData, name: str, extra: list[str], callbacks=()) -> dict:
    from mlra_mega.train.run import train

    run_dir = Path(data.runs) / name
    cfg = load_config(None, [*BASE, *data.overrides(), f"run.dir={run_dir}", *extra])
    history, _ = train(cfg, callbacks, log=lambda s: None)
    out = {m.step: {k: v for k, v in m.extra.items()
                  if k.startswith(("stability/grad_norm/", "stability/param_norm/", "stability/resid_var/",
                                   "stability/grad_var"))} for m in history}
    sidecar = torch.load(run_dir / "checkpoints" / "step00000004" / "sidecar.pt", weights_only=True)
    return {"extra": out, "states": sidecar["callbacks"]}


class MicroGrads(Callback):
    """Every micro-batch's own gradient of every parameter (one process), for the definition."""

    def __init__(self) -> None:
        self.current: dict[str, torch.Tensor] = {}
        self.by_step: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.step = 0

    def on_fit_start(self, trainer) -> None:
        gas = trainer.engine.gradient_accumulation_steps()
        self.trainer = trainer
        for name, p in trainer.model.named_parameters():
            p.register_hook(lambda g, name=name: self.current.__setitem__(name, g.detach().double() * gas))
        original = trainer.engine.backward

        def backward(loss, **kw):
            self.current = {}
            out = original(loss, **kw)
            self.by_step.setdefault(trainer.step, []).append(self.current)
            return out

        trainer.engine.backward = backward


def _variance_by_definition(micro: list[dict[str, torch.Tensor]], names: list[str]) -> float:
    flat = torch.stack([torch.cat([m[n].flatten() for n in names]) for m in micro])
    return float(((flat - flat.mean(0)) ** 2).sum(1).mean() / flat.shape[1])


@dist_case(1)
def one_process(data: TrainData) -> dict:
    grads = MicroGrads()
    out = _run(data, "tp1", ["zero.stage=0", "diagnostics.grad_variance_interval=2"], [grads])
    names = list(grads.current)
    out["by_definition"] = {s: {"stability/grad_var": _variance_by_definition(m, names),
                                "stability/grad_var_embedding": _variance_by_definition(
                                    m, ["embedding.word_embeddings.weight"])}
                            for s, m in grads.by_step.items() if s % 2 == 0}
    out["micro_batches"] = {s: len(m) for s, m in grads.by_step.items()}
    out["subset"] = _run(data, "subset", ["zero.stage=0", "diagnostics.layers=[1]"])["extra"][2]
    return out


@dist_case(2)
def two_processes(data: TrainData) -> dict:
    return {"tp2": _run(data, "tp2", ["parallel.tensor=2", "zero.stage=1", "diagnostics.grad_variance_interval=2"]),
            "tp2_sp": _run(data, "tp2sp", ["parallel.tensor=2", "zero.stage=1", "parallel.sequence_parallel=true"]),
            "dp2_zero3": _run(data, "dp2z3", ["zero.stage=3"]),
            "tp2_recompute": _run(data, "tp2ac", ["parallel.tensor=2", "zero.stage=2", "train.recompute=full"]),
            "dp2_zero1": _run(data, "dp2z1", ["zero.stage=1", "diagnostics.grad_variance_interval=2"])}


def _close(run: dict, ref: dict, keys_from: dict) -> None:
    for step, values in keys_from.items():
        for key, v in values.items():
            assert abs(run[step][key] - ref[step][key]) <= REL * abs(ref[step][key]), (step, key, run[step][key],
                                                                                       ref[step][key])


def test_grad_variance_is_its_definition(data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "one_process", data=data)
    assert set(ref["micro_batches"].values()) == {4}
    for step, expected in ref["by_definition"].items():
        for key, value in expected.items():
            assert ref["extra"][step][key] == pytest.approx(value, rel=1e-9), (step, key)


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "dp2_zero3", "dp2_zero1", "tp2_recompute"])
def test_diagnostics_match_one_process(layout: str, data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "one_process", data=data)
    expected_keys = {f"stability/{kind}/{g}" for kind in ("grad_norm", "param_norm")
                     for g in ("embedding", "layer_00", "layer_01", "layer_02", "final_norm")}
    expected_keys |= {f"stability/resid_var/layer_{i:02d}" for i in range(4)}
    assert set(ref["extra"][2]) >= expected_keys and not ref["extra"][1]
    for rank_out in dist_result(__name__, 2, "two_processes", data=data):
        run = rank_out[layout]["extra"]
        keys = {s: {k: v for k, v in vals.items() if layout in ("tp2", "dp2_zero1") or not k.startswith("stability/grad_var")}
                for s, vals in run.items()}
        assert set(keys[2]) >= expected_keys
        _close(run, ref["extra"], keys)


def test_states_reach_the_checkpoint(data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "one_process", data=data)
    states = ref["states"]
    assert [s[0] for s in states["grad_variance"]["series"]] == [2, 4]
    assert len(states["spike_monitor"]["detector"]["history"]) == 4


def test_grad_variance_is_refused_where_gradients_are_already_reduced() -> None:
    with pytest.raises(ConfigError, match="diagnostics.grad_variance_interval.*ZeRO-2"):
        load_config(None, ["zero.stage=2", "diagnostics.grad_variance_interval=10"])


def test_a_layer_subset_reports_only_those_layers(data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "one_process", data=data)
    keys = set(ref["subset"])
    assert {"stability/grad_norm/layer_01", "stability/param_norm/layer_01", "stability/grad_norm/embedding", "stability/grad_norm/final_norm"} <= keys
    assert not {"stability/grad_norm/layer_00", "stability/grad_norm/layer_02", "stability/param_norm/layer_02"} & keys
    # stability/resid_var/layer_00 is the embedding's output; layer_02 is after layer index 1.
    assert {k for k in keys if k.startswith("stability/resid_var/")} == {"stability/resid_var/layer_00", "stability/resid_var/layer_02"}
    assert ref["subset"]["stability/grad_norm/layer_01"] == ref["extra"][2]["stability/grad_norm/layer_01"]


def test_spike_monitor_counts_tev_jumps_and_spikes() -> None:
    from types import SimpleNamespace

    from mlra_mega.train.stability import SpikeMonitor

    cfg = load_config(None, ["diagnostics.spike_min_history=3", "diagnostics.tev_jump=0.1"])
    said: list[str] = []
    monitor = SpikeMonitor(cfg.diagnostics, log=said.append)
    series = [(2.0, 1.0), (2.01, 1.01), (1.99, 1.02), (2.0, 1.03), (2.02, 1.3), (9.0, 1.31)]
    extras = []
    for step, (loss, tev) in enumerate(series, 1):
        recorded: dict[str, float] = {}
        trainer = SimpleNamespace(record_metric=recorded.__setitem__)
        monitor.on_step_end(trainer, SimpleNamespace(step=step, loss=loss, tev_mean=tev))
        extras.append(recorded)
    assert extras[-1]["tev/jumps"] == 1 and extras[-1]["stability/loss_spikes"] == 1
    assert any("TEV jump at step 5" in x for x in said) and any("loss spike at step 6" in x for x in said)
    assert "stability/loss_spike_score" not in extras[2] and extras[-1]["stability/loss_spike_score"] > 6
