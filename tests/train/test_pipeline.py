"""Pipeline parallelism trains like one process: every layout, variant and embedding tie.

Reference: one process (PP=1, ZeRO-0, fp32). Compared over 8 steps on the same global batches
(4 layers, hidden 64, 4 micro-batches per step, clipping active on every step): the loss, the
pre-clip gradient norm, TEV and the per-layer diagnostics (gradient and parameter norms,
residual variance, by global layer number), for PP=2 (world 2), PP=4 (4), TP=2 x PP=2 (4), PP=2 x DP=2 (4)
and TP=2 x PP=2 x DP=2 (8), within 1e-5 relative; bf16 at PP=2 within 2e-2. Also: a stage's
weights at init are the PP=1 model's (the init replay), an uneven split trains like the rest,
the checkpoint's per-stage parameter files hold the PP=1 names.
"""

from __future__ import annotations

import socket

import pytest

from mlra_mega.config import ConfigError, load_config
from tests.conftest import TrainData, train_data
from tests.dist import dist_case, dist_result

pytestmark = pytest.mark.slow  # every test here launches processes

CLIP = 0.05
STEPS = 8
REL = 1e-5
BF16_REL = 2e-2
BASE = ["model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=32",
        f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
        f"optim.clip_grad={CLIP}", "optim.lr=1e-3", "optim.warmup_steps=2", "metrics.tev_interval=4",
        "eval.interval=8", "eval.iters=2", "tracking.enabled=false", "diagnostics.interval=4"]
# The model variants compared (model.* overrides); each layout runs those named for it.
VARIANTS = {
    "mlra": ["model.attention=mlra"],
    "mlra_untied": ["model.attention=mlra", "model.tie_embeddings=false"],
    "mha": ["model.attention=mha"],
    "mlra_scaled": ["model.attention=mlra", "model.embedding=scaled"],
    "mlra_embed_ln": ["model.attention=mlra", "model.embedding=layernorm"],
    "llama_mlra_gqa": ["model.arch=llama", "model.attention=mlra", "model.num_kv_heads=2"],
}
# layout -> (world size, parallel overrides, variants)
LAYOUTS = {
    "pp2": (2, ["parallel.pipeline=2", "metrics.comm_interval=1"], ["mlra", "mlra_untied", "mha", "mlra_scaled",
                                                                    "mlra_embed_ln",
                                         "llama_mlra_gqa"]),
    "pp2_uneven": (2, ["parallel.pipeline=2", "parallel.pipeline_layers=[1,3]"], ["mlra"]),
    "pp4": (4, ["parallel.pipeline=4"], ["mlra"]),
    "tp2_pp2": (4, ["parallel.pipeline=2", "parallel.tensor=2"], ["mlra", "mlra_untied", "mha", "llama_mlra_gqa"]),
    "tp2_pp2_sp": (4, ["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true"], ["mlra"]),
    "pp2_dp2": (4, ["parallel.pipeline=2"], ["mlra"]),
    "tp2_pp2_dp2": (8, ["parallel.pipeline=2", "parallel.tensor=2"], ["mlra"]),
}


def _overrides(data: TrainData, extra: list[str]) -> list[str]:
    return [*BASE, *data.overrides(), *extra]


def _train(data: TrainData, extra: list[str], callbacks=()) -> dict:
    from mlra_mega.train.callbacks import Callback
    from mlra_mega.train.run import train

    class Evals(Callback):
        name = "test_evals"
        val: list[float] = []

        def on_eval_end(self, trainer, step, result) -> None:
            self.val = [*self.val, result["eval/loss"]]

    evals = Evals()
    history, run_dir = train(load_config(None, _overrides(data, extra)), [*callbacks, evals], log=lambda s: None)
    return {"val_loss": evals.val, "loss": [m.loss for m in history], "grad_norm": [m.grad_norm for m in history],
            "tev": [m.tev_mean for m in history if m.tev_mean is not None], "run_dir": str(run_dir),
            "layers": [{k: v for k, v in m.extra.items() if k.startswith(("stability/grad_norm/", "stability/param_norm/", "stability/resid_var/"))}
                       for m in history if m.step % 4 == 0],
            # step 7: neither TEV nor the diagnostics (every 4 steps) communicate in it
            "comm": {k: v for m in history if m.step == 7 for k, v in m.extra.items() if k.startswith("comm/")}}


@pytest.fixture(scope="module")
def data(tokenizer_dir, sample_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return train_data(tokenizer_dir, sample_dataset, tmp_path_factory, "runs")


DEEP = ["model.num_layers=96", "train.steps=1", "diagnostics.interval=0", "metrics.tev_interval=0",
        "checkpoint.interval=0", "model.attention=mlra", "zero.stage=1"]


def _deep_bytes(data: TrainData, extra: list[str]) -> dict:
    """Parameter and optimizer bytes of this rank after one step of the 96-layer model."""
    import os

    from mlra_mega.train.callbacks import Callback
    from mlra_mega.train.memory import optimizer_state_bytes, parameter_bytes

    class Bytes(Callback):
        def on_fit_end(self, trainer) -> None:
            self.params = parameter_bytes(trainer.model)
            self.optimizer = optimizer_state_bytes(trainer.engine)
            self.other_numel = sum(p.numel() for n, p in trainer.model.named_parameters() if ".layers." not in n)

    probe = Bytes()
    run_dir = os.path.join(data.runs, "deep-" + "-".join(e.replace("=", "") for e in extra))
    _train(data, [*DEEP, *extra, f"run.dir={run_dir}", "checkpoint.resume=never"], [probe])
    return {"params": probe.params, "optimizer": probe.optimizer, "other_numel": probe.other_numel}


@dist_case(1)
def reference(data: TrainData) -> dict:
    out = {v: _train(data, ["zero.stage=0", *VARIANTS[v]]) for v in VARIANTS}
    out["deep"] = _deep_bytes(data, [])
    return out


def _layouts(world: int, data: TrainData) -> dict:
    out = {}
    for name, (w, extra, variants) in LAYOUTS.items():
        if w == world:
            out[name] = {v: _train(data, [*extra, *VARIANTS[v]]) for v in variants}
    return out


@dist_case(2)
def world2(data: TrainData) -> dict:
    out = _layouts(2, data)
    out["bf16"] = _train(data, ["parallel.pipeline=2", "train.precision=bf16", *VARIANTS["mlra"]])
    return out


RESUME = ["parallel.pipeline=2", "model.attention=mlra", "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
          "checkpoint.interval=4"]


@dist_case(4)
def world4(data: TrainData) -> dict:
    import os

    out = _layouts(4, data)
    # PP=2 x DP=2 with dropout: straight, and stopped at step 4 then resumed from its checkpoint.
    root = os.path.join(data.runs, "resume")
    out["straight"] = _train(data, [*RESUME, f"run.dir={root}/straight"])
    out["stopped"] = _train(data, [*RESUME, f"run.dir={root}/resumed", "train.stop_at=4"])
    out["resumed"] = _train(data, [*RESUME, f"run.dir={root}/resumed"])
    out["deep"] = _deep_bytes(data, ["parallel.pipeline=4"])
    return out


@dist_case(8)
def world8(data: TrainData) -> dict:
    return _layouts(8, data)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _check(run: dict, ref: dict, tol: float) -> None:
    assert len(run["loss"]) == len(ref["loss"]) == STEPS
    assert all(g > CLIP for g in ref["grad_norm"] + run["grad_norm"]), "clipping must fire on every step"
    for step, (a, b) in enumerate(zip(run["loss"], ref["loss"]), start=1):
        assert _rel(a, b) <= tol, f"loss at step {step}: {a} vs {b}"
    for step, (a, b) in enumerate(zip(run["grad_norm"], ref["grad_norm"]), start=1):
        assert _rel(a, b) <= tol, f"grad norm at step {step}: {a} vs {b}"
    assert len(run["tev"]) == len(ref["tev"]) == 2
    assert all(_rel(a, b) <= tol for a, b in zip(run["tev"], ref["tev"])), (run["tev"], ref["tev"])
    # Evaluation (the schedule forward-only at PP > 1) at the last step.
    assert len(run["val_loss"]) == len(ref["val_loss"]) == 1 and _rel(run["val_loss"][0], ref["val_loss"][0]) <= tol
    # Per-layer diagnostics under global layer numbers, every stage's layers, at steps 4 and 8.
    for got, want in zip(run["layers"], ref["layers"], strict=True):
        assert set(got) == set(want) and any(k.startswith("stability/resid_var/layer_04") for k in want)
        bad = {k: (got[k], want[k]) for k in want if _rel(got[k], want[k]) > tol}
        assert not bad, bad


CASES = [(layout, v) for layout, (_, _, variants) in LAYOUTS.items() for v in variants]


@pytest.mark.parametrize("layout,variant", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_pipeline_matches_one_process(layout: str, variant: str, data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "reference", data=data)
    world = LAYOUTS[layout][0]
    for rank_runs in dist_result(__name__, world, f"world{world}", data=data):
        _check(rank_runs[layout][variant], ref[variant], REL)


@pytest.mark.parametrize("variant", ["mlra", "mlra_untied"])
def test_the_communication_ledger_matches_the_closed_form(variant: str, data: TrainData) -> None:
    """Rank 0 (the first stage) at PP2, step 7 as the ledger counted it: activations sent and
    gradients received per micro-batch, the loss's broadcast, the tied embedding's gradient
    all-reduce (none untied), DeepSpeed's norm: equal to comm.expected to the byte and the call."""
    from mlra_mega.comm.expected import expected_step
    from mlra_mega.plan import stage_numel
    from mlra_mega.train.run import _with_tokenizer_vocab

    _, extra, _ = LAYOUTS["pp2"]
    cfg, _ = _with_tokenizer_vocab(load_config(None, _overrides(data, [*extra, *VARIANTS[variant]])))
    want = expected_step(cfg, tp=1, pp=2, dp=1, zero=1, params=sum(stage_numel(cfg, 1, 2, 0)), tev=False)
    assert ("embedding" in want) == (variant == "mlra")
    got = dist_result(__name__, 2, "world2", data=data)[0]["pp2"][variant]["comm"]
    assert {k.split("/")[1] for k, v in got.items() if k.endswith("/calls") and v} == set(want)
    for group, x in want.items():
        assert got[f"comm/{group}/bytes"] == pytest.approx(x.bytes, abs=0.5), group
        assert got[f"comm/{group}/calls"] == x.calls, group


def test_bf16_pipeline_tracks_fp32(data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "reference", data=data)
    for run in dist_result(__name__, 2, "world2", data=data):
        run = run["bf16"]
        assert max(_rel(a, b) for a, b in zip(run["loss"], ref["mlra"]["loss"])) <= BF16_REL
        assert all(g > CLIP for g in run["grad_norm"])


def test_pipeline_refusals(data: TrainData) -> None:
    with pytest.raises(ConfigError, match="zero.stage.*ZeRO-2 cannot combine with pipeline"):
        load_config(None, _overrides(data, ["parallel.pipeline=2", "zero.stage=2"]))
    with pytest.raises(ConfigError, match="zero.stage.*ZeRO-3"):
        load_config(None, _overrides(data, ["parallel.pipeline=2", "zero.stage=3"]))
    with pytest.raises(ConfigError, match="parallel.pipeline: 3 stages do not split model.num_layers=4"):
        load_config(None, _overrides(data, ["parallel.pipeline=3"]))
    with pytest.raises(ConfigError, match=r"parallel.pipeline_layers: \[2, 3\] does not split"):
        load_config(None, _overrides(data, ["parallel.pipeline=2", "parallel.pipeline_layers=[2,3]"]))
    with pytest.raises(ConfigError, match="diagnostics.grad_variance_interval"):
        load_config(None, _overrides(data, ["parallel.pipeline=2", "diagnostics.grad_variance_interval=2"]))
    cfg = load_config(None, _overrides(data, ["parallel.pipeline=2", "parallel.tensor=2"]))
    from mlra_mega.train.run import validate_layout

    with pytest.raises(ConfigError, match="parallel.pipeline: tensor x pipeline = 2 x 2 does not divide the world "
                                          "size 6"):
        validate_layout(cfg, 6)
    assert validate_layout(cfg, 8) == 2


def test_resume_at_pp2_dp2_is_bit_for_bit(data: TrainData) -> None:
    for run in dist_result(__name__, 4, "world4", data=data):
        straight, stopped, resumed = run["straight"], run["stopped"], run["resumed"]
        assert len(stopped["loss"]) == 4 and len(resumed["loss"]) == 4
        assert stopped["loss"] + resumed["loss"] == straight["loss"]
        assert stopped["grad_norm"] + resumed["grad_norm"] == straight["grad_norm"]
        assert len(set(straight["loss"])) == STEPS


def test_pipeline_checkpoint_files(data: TrainData) -> None:
    from pathlib import Path

    from mlra_mega.train.checkpoint import find_checkpoint, read_sidecar
    from mlra_mega.train.safe_load import safe_load

    run = dist_result(__name__, 4, "world4", data=data)[0]["tp2_pp2"]["mlra"]
    ckpt = find_checkpoint(Path(run["run_dir"]), verify_hashes=True)
    assert read_sidecar(ckpt)["layout"] == {"tensor": 2, "data": 1, "zero_stage": 1, "pipeline": 2}
    assert not (ckpt.path / "model").exists()  # the weights are written once, in DeepSpeed's files
    files = sorted(ckpt.path.glob("mp_rank_*"))
    assert [p.name for p in files] == [f"mp_rank_0{i}_model_states.pt" for i in range(4)]
    layers: dict[tuple[int, int], set[int]] = {}
    for f in files:
        states = safe_load(f)
        meta = states["mlra"]  # our record of the file's TP rank and stage (train/elastic.py)
        layers[meta["tp_rank"], meta["pp_rank"]] = {int(k.split(".")[2]) + meta["layer_offset"]
                                                    for k in states["module"] if k.startswith("decoder.layers.")}
        if meta["pp_rank"] == 0:
            assert "embedding.word_embeddings.weight" in states["module"]
    assert layers == {(t, 0): {0, 1} for t in (0, 1)} | {(t, 1): {2, 3} for t in (0, 1)}


def test_export_from_a_tp2_pp2_checkpoint(data: TrainData, tmp_path, tokenizer_dir) -> None:
    """The Hugging Face model exported from TP=2 x PP=2 gives the one-process run's logits."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from mlra_mega import distributed
    from mlra_mega.cli import main
    from mlra_mega.config import ParallelConfig
    from mlra_mega.data.tokenizer import load_tokenizer
    from mlra_mega.export import load_checkpoint_model

    (ref,) = dist_result(__name__, 1, "reference", data=data)
    run = dist_result(__name__, 4, "world4", data=data)[0]["tp2_pp2"]["mlra"]
    assert main(["export-hf", run["run_dir"], str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([load_tokenizer(tokenizer_dir).encode(["Return the number of items in a container."])[0]])
    distributed.setup(ParallelConfig(tensor=1), seed=0)
    try:
        one, cfg, _ = load_checkpoint_model(Path(ref["mlra"]["run_dir"]))
        with torch.no_grad():
            want = one(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)
            got = hf(ids).logits
    finally:
        distributed.teardown()
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def _launch(nproc: int, args: list[str]):
    import os
    import subprocess
    import sys

    from tests.train.test_signals import REPO

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "mlra_mega", "train", str(REPO / "configs" / "quickstart.yaml"), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))


def _stage_args(data: TrainData, run_dir, pp: int) -> list[str]:
    return [*BASE, *data.overrides(), f"run.dir={run_dir}", "train.steps=300", f"parallel.pipeline={pp}",
            "diagnostics.interval=0", "checkpoint.interval=40"]


def test_sigusr1_to_one_stage_stops_every_rank_with_a_checkpoint(data: TrainData, tmp_path) -> None:
    import json
    import os
    import signal

    from mlra_mega.train.signals import PREEMPTED
    from tests.train.test_checkpoint import steps
    from tests.train.test_signals import finish, rank_process, wait_for_steps

    run = tmp_path / "run"
    proc = _launch(2, [*_stage_args(data, run, 2), "tracking.enabled=true", f"run.root={tmp_path}",
                       "metrics.tev_interval=1"])
    wait_for_steps(run, 5, proc)
    os.kill(rank_process(proc, 1).pid, signal.SIGUSR1)  # the last stage only
    out = finish(proc, timeout=120)
    marker = json.loads((run / PREEMPTED).read_text())
    stopped = marker["step"]
    assert marker["saved"] and marker["signal"] == "SIGUSR1" and 5 <= stopped < 300, out[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{stopped:08d}"
    assert [r["step"] for r in steps(run)] == list(range(1, stopped + 1))
    assert sorted(p.name for p in (run / "checkpoints" / f"step{stopped:08d}").glob("mp_rank_*")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    # Rank 0 (the first stage) tracked every step: the last stage's loss, its own TEV.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert mlrun.data.tags["layout"] == "tp1xpp2xdp1"
    for key in ("train/loss", "tev/mean", "train/grad_norm"):
        got = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}
        assert got == {r["step"]: r[key] for r in steps(run)}, key


def test_sigkill_of_a_middle_stage_ends_the_job_naming_it(data: TrainData, tmp_path) -> None:
    import time

    from tests.train.test_signals import finish, rank_process, wait_for_steps

    run = tmp_path / "run"
    proc = _launch(4, _stage_args(data, run, 4))
    wait_for_steps(run, 10, proc, timeout=240)
    victim = rank_process(proc, 1)  # stage 1 of 0-3
    t_kill = time.time()
    victim.kill()
    out = finish(proc, timeout=120, check=False)
    kill_to_exit = time.time() - t_kill
    assert proc.returncode != 0 and kill_to_exit < 60, out[-3000:]
    assert f"lost rank(s) 1 ({socket.gethostname()}) during step" in out, out[-3000:]
    print(f"\n[dead stage] PP=4: SIGKILL of rank 1 (a middle stage) to the launcher's exit {kill_to_exit:.2f}s")


def test_96_layers_at_pp4_hold_a_quarter_of_the_layer_bytes_per_rank(data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "reference", data=data)
    one = ref["deep"]
    # ZeRO-1 at DP=1 keeps 12 bytes per parameter (fp32 master, two moments): the rest is layers'.
    one_layers_opt = one["optimizer"] - 12 * one["other_numel"]
    rows = []
    for rank, run in enumerate(dist_result(__name__, 4, "world4", data=data)):
        deep = run["deep"]
        layer_opt = deep["optimizer"] - 12 * deep["other_numel"]
        rows.append((rank, deep["params"]["layers"], layer_opt, deep["params"]["other"]))
        assert abs(deep["params"]["layers"] / one["params"]["layers"] - 0.25) <= 0.25 * 0.02
        assert abs(layer_opt / one_layers_opt - 0.25) <= 0.25 * 0.02, (layer_opt, one_layers_opt)
    # Embedding on the first stage, final norm and the tied output copy on the last, nothing between.
    others = [r[3] for r in rows]
    assert others[1] == others[2] == 0 and others[0] > 0 and others[3] > 0
    print(f"\n[96 layers] PP=1 layers {one['params']['layers']} B, optimizer {one['optimizer']} B; per rank at PP=4 "
          "(rank, layer params, layer optimizer, embedding/output params): " + ", ".join(map(str, rows)))
