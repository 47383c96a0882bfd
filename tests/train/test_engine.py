"""The engine: every TP x DP layout and ZeRO stage trains like one process; ZeRO shards state.

Reference: TP=1 x DP=1, ZeRO-0, fp32 (one process). Compared: TP=2 x DP=2 (four processes) at
ZeRO 0 / 1 / 2 / 3, with sequence parallelism, with activation checkpointing, in bf16, and
TP=2 under the deepspeed launcher: per-step loss and pre-clip gradient norm over 8 steps on the
same global batches. Clipping (optim.clip_grad=0.05) fires on every step of every run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlra_mega.config import ConfigError, load_config
from mlra_mega.train.engine import deepspeed_config, lr_factor
from mlra_mega.train.run import validate_layout
from tests.conftest import TrainData, train_data
from tests.dist import dist_case, dist_result

pytestmark = pytest.mark.slow  # every test here launches processes

REPO = Path(__file__).resolve().parents[2]
CLIP = 0.05
STEPS = 8
BASE = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=32",
        "model.attention=mlra", f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
        f"optim.clip_grad={CLIP}", "optim.lr=1e-3", "optim.warmup_steps=2", "metrics.tev_interval=4",
        "eval.interval=0"]
LAYOUTS = {
    "zero0": ["zero.stage=0"],
    "zero1": ["zero.stage=1", "metrics.comm_interval=1"],
    # DeepSpeed reduces each gradient slice to its owner instead of all-reducing whole buckets
    "zero1_reduce": ["zero.stage=1", f"zero.template={REPO / 'ds_configs' / 'zero-reduce.json'}",
                     "metrics.comm_interval=1"],
    "zero2": ["zero.stage=2"],
    "zero3": ["zero.stage=3"],
    "sequence_parallel": ["zero.stage=1", "parallel.sequence_parallel=true", "metrics.comm_interval=1"],
    "sequence_parallel_zero0": ["zero.stage=0", "parallel.sequence_parallel=true"],
    # In DeepSpeed's coalescing window (zero.coalesce_reduction=auto): one reduction per step.
    "sequence_parallel_zero2": ["zero.stage=2", "parallel.sequence_parallel=true", "metrics.comm_interval=1"],
    "sequence_parallel_zero3": ["zero.stage=3", "parallel.sequence_parallel=true"],
    "recompute_full": ["zero.stage=2", "train.recompute=full"],
    "recompute_selective": ["zero.stage=1", "train.recompute=selective"],
    "bf16": ["zero.stage=1", "train.precision=bf16"],
}
# Llama blocks (grouped-query MLRA, SwiGLU, RMSNorm, rotary, untied) at the layouts whose code
# paths differ for them: the norms' sequence-parallel reduction, ZeRO-3's partitioning of the
# 3-D SwiGLU projection.
LLAMA = ["model.arch=llama", "model.num_kv_heads=2"]
LLAMA_LAYOUTS = {
    "llama_sequence_parallel": ["zero.stage=1", "parallel.sequence_parallel=true"],
    "llama_zero3": ["zero.stage=3"],
}
REL = 1e-5
BF16_REL = 2e-2


def _overrides(data: TrainData, extra: list[str]) -> list[str]:
    return [*BASE, *data.overrides(), *extra]


def _train(data: TrainData, extra: list[str], callbacks=()) -> dict:
    from mlra_mega.train.run import train

    import torch.distributed as dist

    from mlra_mega.train.checkpoint import find_checkpoint, read_sidecar
    from mlra_mega.train.elastic import read_state

    history, run_dir = train(load_config(None, _overrides(data, extra)), callbacks, log=lambda s: None)
    out = {"loss": [m.loss for m in history], "grad_norm": [m.grad_norm for m in history],
           "tev": [m.tev_mean for m in history if m.tev_mean is not None],
           "comm": {**{k: v for k, v in history[-1].extra.items() if k.startswith("comm/")},
                    "perf/data_wait_s": history[-1].as_dict()["perf/data_wait_s"]}}
    if dist.get_rank() == 0:  # the final checkpoint read back layout-free (train/elastic.py)
        ckpt = find_checkpoint(run_dir)
        out["state"] = read_state(ckpt.path, read_sidecar(ckpt)["layout"]).params
    return out


@pytest.fixture(scope="module")
def data(tokenizer_dir: Path, sample_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return train_data(tokenizer_dir, sample_dataset, tmp_path_factory, "runs")


@dist_case(1)
def reference(data: TrainData) -> dict:
    return _train(data, ["zero.stage=0"])


@dist_case(1)
def reference_llama(data: TrainData) -> dict:
    return _train(data, ["zero.stage=0", *LLAMA])


@dist_case(4)
def tp2_dp2(data: TrainData) -> dict:
    from mlra_mega.train.callbacks import Callback

    class Dtype(Callback):
        def on_fit_end(self, trainer) -> None:
            self.dtype = str(next(trainer.model.parameters()).dtype)

    out = {}
    for name, extra in LAYOUTS.items():
        probe = Dtype()
        out[name] = _train(data, [*extra, "parallel.tensor=2"], [probe])
        out[name]["dtype"] = probe.dtype
    for name, extra in LLAMA_LAYOUTS.items():
        out[name] = _train(data, [*extra, *LLAMA, "parallel.tensor=2"])
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _check(run: dict, ref: dict, tol: float, grad_tol: float | None = None) -> None:
    assert len(run["loss"]) == len(ref["loss"]) == STEPS
    assert all(g > CLIP for g in ref["grad_norm"] + run["grad_norm"]), "clipping must fire on every step"
    for step, (a, b) in enumerate(zip(run["loss"], ref["loss"]), start=1):
        assert _rel(a, b) <= tol, f"loss at step {step}: {a} vs {b}"
    for step, (a, b) in enumerate(zip(run["grad_norm"], ref["grad_norm"]), start=1):
        assert _rel(a, b) <= (grad_tol or tol), f"grad norm at step {step}: {a} vs {b}"


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "bf16"])
def test_tp2_dp2_matches_one_process(layout: str, data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "reference", data=data)
    runs = dist_result(__name__, 4, "tp2_dp2", data=data)
    for rank_runs in runs:
        run = rank_runs[layout]
        _check(run, ref, REL)
        assert run["dtype"] == "torch.float32"
        # TEV recorded during the run (ZeRO-3: on the gathered rows) is the one-process TEV.
        assert len(run["tev"]) == 2 and all(_rel(a, b) <= REL for a, b in zip(run["tev"], ref["tev"]))


@pytest.mark.parametrize("layout", ["zero1", "zero1_reduce", "sequence_parallel", "sequence_parallel_zero2"])
def test_the_communication_ledger_matches_the_closed_form(layout: str, data: TrainData) -> None:
    """Rank 0's last step (TEV due) at TP2 x DP2, as the ledger counted it in metrics.jsonl's
    comm/<group>/bytes, against comm.expected: equal to the byte where our code and DeepSpeed's
    reduce path make the minimal calls; DeepSpeed's default all-reduce of whole gradient buckets
    sends the gradients' second half too (exactly (n-1)/n P more); under sequence parallelism the
    partial gradients go in one call per step, and megatron's all-reduce of the embedding output
    is the one excess. At ZeRO-2, in the coalescing window, the gradients are reduced once per
    step, not in each of the two micro-batches' backward."""
    from mlra_mega.comm.expected import expected_step
    from mlra_mega.plan import stage_numel
    from mlra_mega.train.run import _with_tokenizer_vocab

    cfg, _ = _with_tokenizer_vocab(load_config(None, _overrides(data, [*LAYOUTS[layout], "parallel.tensor=2"])))
    params = sum(stage_numel(cfg, 2, 1, 0))
    want = expected_step(cfg, tp=2, pp=1, dp=2, zero=cfg.zero.stage, params=params)
    assert set(want) == {"tp", "dp", "mp", "world"}
    got = dist_result(__name__, 4, "tp2_dp2", data=data)[0][layout]["comm"]
    assert got["perf/data_wait_s"] >= 0
    for group, x in want.items():
        sent = got[f"comm/{group}/bytes"]
        if group == "dp" and layout != "zero1_reduce":
            assert sent == pytest.approx(x.bytes + 0.5 * params * 4, abs=0.5), group
        elif group == "tp" and layout.startswith("sequence_parallel"):
            # The sequence-parallel gradients in one call per step; megatron all-reduces the
            # embedding's output (learned positions are added after the vocabulary-parallel
            # lookup) where a reduce-scatter would send half: (n-1)/n A more per micro-batch.
            act = cfg.train.micro_batch_size * cfg.model.seq_length * cfg.model.hidden_size * 4
            micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * 2)
            assert sent == pytest.approx(x.bytes + micro * 0.5 * act, abs=0.5), (sent, x.bytes)
            assert got["comm/tp/calls"] == x.calls
        else:
            assert sent == pytest.approx(x.bytes, abs=0.5), (group, sent, x.bytes)
            if x.calls is not None:
                assert got[f"comm/{group}/calls"] == x.calls, group


@pytest.mark.parametrize("layout", list(LLAMA_LAYOUTS))
def test_llama_blocks_at_tp2_dp2_match_one_process(layout: str, data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "reference_llama", data=data)
    for rank_runs in dist_result(__name__, 4, "tp2_dp2", data=data):
        run = rank_runs[layout]
        _check(run, ref, REL)
        assert len(run["tev"]) == 2 and all(_rel(a, b) <= REL for a, b in zip(run["tev"], ref["tev"]))
    (gpt2,) = dist_result(__name__, 1, "reference", data=data)
    assert ref["loss"][-1] != gpt2["loss"][-1]  # really another model
    # Its checkpoint read layout-free (the SwiGLU [2, f, d] joined along f) is the one-process state.
    from mlra_mega.train.elastic import KEYS

    got, want = dist_result(__name__, 4, "tp2_dp2", data=data)[0][layout]["state"], ref["state"]
    assert set(got) == set(want) and any(n.endswith("mlp.linear_fc1.weight") for n in want)
    for key in KEYS:
        scale = max(t[key].abs().max().item() for t in want.values())
        worst = max((got[n][key] - want[n][key]).abs().max().item() for n in want)
        assert scale > 0 and worst <= REL * scale, f"{key}: {worst} vs scale {scale}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_zero_stage_checkpoint_reads_back_layout_free(layout: str, data: TrainData) -> None:
    """DeepSpeed's files of TP=2 x DP=2 at each stage, read by `elastic.read_state` as TP=1 state,
    hold the one-process run's weights and AdamW moments."""
    from mlra_mega.train.elastic import KEYS

    (ref,) = dist_result(__name__, 1, "reference", data=data)
    got, want = dist_result(__name__, 4, "tp2_dp2", data=data)[0][layout]["state"], ref["state"]
    assert set(got) == set(want) and len(want) > 20
    tol = BF16_REL if layout == "bf16" else REL
    for key in KEYS:
        scale = max(t[key].abs().max().item() for t in want.values())
        worst = max((got[n][key] - want[n][key]).abs().max().item() for n in want)
        assert scale > 0 and worst <= tol * scale, f"{key}: {worst} vs scale {scale}"


def test_bf16_tracks_fp32(data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "reference", data=data)
    run = dist_result(__name__, 4, "tp2_dp2", data=data)[0]["bf16"]
    assert run["dtype"] == "torch.bfloat16"
    assert max(_rel(a, b) for a, b in zip(run["loss"], ref["loss"])) <= BF16_REL
    assert all(g > CLIP for g in run["grad_norm"])


@dist_case(1)
def fused_adamw(data: TrainData) -> dict:
    from mlra_mega.train.callbacks import Callback

    class Fused(Callback):
        def on_fit_end(self, trainer) -> None:
            self.fused = trainer.engine.basic_optimizer.defaults["fused"]

    probe = Fused()
    out = _train(data, ["zero.stage=1", "optim.fused=true"], [probe])
    out["fused"] = probe.fused
    return out


def test_fused_adamw_is_used_and_trains_like_the_for_each_one(data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "reference", data=data)
    (run,) = dist_result(__name__, 1, "fused_adamw", data=data)
    assert run["fused"] is True
    _check(run, ref, REL)


@dist_case(2)
def optimizer_state(data: TrainData) -> dict:
    """exp_avg / exp_avg_sq elements on this rank at DP=2, and what the layout predicts."""
    from mlra_mega.train.callbacks import Callback

    class Grab(Callback):
        def on_fit_end(self, trainer) -> None:
            inner = trainer.engine.optimizer.optimizer
            self.state = {k: sum(s[k].numel() for s in inner.state.values()) for k in ("exp_avg", "exp_avg_sq")}
            params = list(trainer.model.parameters())
            numel = [p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params]
            self.groups = [sum(n for p, n in zip(params, numel) if (p.dim() >= 2 or hasattr(p, "ds_shape")
                                                                      and len(p.ds_shape) >= 2) == big)
                           for big in (True, False)]
            self.per_param = numel

    out = {}
    for stage in (1, 2, 3):
        grab = Grab()
        _train(data, [f"zero.stage={stage}", "train.steps=1", "model.ffn_hidden_size=101"], [grab])
        out[stage] = {"state": grab.state, "groups": grab.groups, "per_param": grab.per_param}
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_shards_optimizer_state_over_dp(stage: int, data: TrainData) -> None:
    dp = 2
    for rank in dist_result(__name__, 2, "optimizer_state", data=data):
        got = rank[stage]
        total = sum(got["per_param"])
        if stage < 3:
            # ZeRO-1/2 flatten each parameter group and pad it to a multiple of 2 x DP elements
            # (DeepSpeed's alignment factor 2), then give each rank 1/DP of it.
            expected = sum(math.ceil(n / (2 * dp)) * 2 for n in got["groups"])
        else:
            # ZeRO-3 partitions every parameter on its own, padded to a multiple of DP.
            expected = sum(math.ceil(n / dp) for n in got["per_param"])
        assert got["state"]["exp_avg"] == got["state"]["exp_avg_sq"] == expected
        assert 0 < expected - total / dp <= len(got["per_param"])  # the ffn of 101 forces some padding


@dist_case(2)
def tev_at_tp2(data: TrainData) -> tuple[list[float], list[float]]:
    """TEV the trainer records at TP=2 vs TEV of the gathered full embedding, same steps."""
    from mlra_mega.metrics.tev import compute_tev
    from mlra_mega.model.convert import full_state_dict
    from mlra_mega.train.callbacks import Callback

    class Gathered(Callback):
        recorded: list[float] = []
        gathered: list[float] = []

        def on_step_end(self, trainer, m) -> None:
            if m.tev_mean is not None:
                full = full_state_dict(trainer.model)["embedding.word_embeddings.weight"]
                self.recorded.append(m.tev_mean)
                self.gathered.append(compute_tev(full, trainer.model_cfg.vocab_size).mean)

    probe = Gathered()
    _train(data, ["zero.stage=1", "parallel.tensor=2", "metrics.tev_interval=2", "train.steps=4"], [probe])
    return probe.recorded, probe.gathered


def test_tev_at_tp2_equals_tev_of_the_gathered_embedding(data: TrainData) -> None:
    for recorded, gathered in dist_result(__name__, 2, "tev_at_tp2", data=data):
        assert len(recorded) == 2
        assert all(_rel(a, b) <= 1e-9 for a, b in zip(recorded, gathered))


def test_deepspeed_launcher(tmp_path: Path, data: TrainData) -> None:
    (ref,) = dist_result(__name__, 1, "reference", data=data)
    run_dir = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", str(REPO / "launchers" / "train.py"), str(REPO / "configs" / "quickstart.yaml"),
           *_overrides(data, ["zero.stage=1", "parallel.tensor=2", f"run.dir={run_dir}", "metrics.tev_interval=4"])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    run = {"loss": [r["train/loss"] for r in records], "grad_norm": [r["train/grad_norm"] for r in records]}
    _check(run, ref, REL)
    assert json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 1


LAYOUT_ERRORS = [
    (["parallel.tensor=2"], 3, "parallel.tensor", "does not divide the world size 3"),
    (["train.global_batch_size=8", "train.micro_batch_size=2"], 8, "train.global_batch_size",
     "not divisible by micro_batch_size x data-parallel size = 2 x 8"),
]


@pytest.mark.parametrize("overrides,world,field,words", LAYOUT_ERRORS, ids=[e[2] for e in LAYOUT_ERRORS])
def test_invalid_layouts(overrides: list[str], world: int, field: str, words: str) -> None:
    cfg = load_config(None, ["model.vocab_size=256", "model.num_heads=4", "model.hidden_size=64", *overrides])
    with pytest.raises(ConfigError) as info:
        validate_layout(cfg, world)
    assert info.value.field == field and words in str(info.value) and info.value.fix


@pytest.mark.parametrize("overrides,field,words", [
    (["parallel.pipeline=2", "zero.stage=2"], "zero.stage", "ZeRO-2 cannot combine with pipeline parallelism"),
    (["parallel.pipeline=2", "zero.stage=3"], "zero.stage", "ZeRO-3 cannot combine with pipeline parallelism"),
    (["parallel.pipeline=2", "zero.stage=0"], "zero.stage", "ZeRO-0 cannot combine with pipeline parallelism"),
    (["parallel.pipeline=5", "model.num_layers=12"], "parallel.pipeline", "5 stages do not split model.num_layers=12"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel", "needs tensor parallelism"),
    (["zero.stage=5"], "zero.stage", "0, 1, 2 or 3"),
])
def test_invalid_parallel_configs(overrides: list[str], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.field == field and words in str(info.value)


def test_train_cli_refuses_a_bad_layout_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlra_mega.cli import main

    assert main(["train", str(REPO / "configs" / "quickstart.yaml"), "parallel.tensor=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parallel.tensor: 2 does not divide the world size 1" in err


def test_lr_schedule() -> None:
    optim = load_config(None, ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=4"]).optim
    assert [lr_factor(s, optim, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, optim, 14) == 1.0 and lr_factor(14, optim, 14) == pytest.approx(0.1)
    assert lr_factor(9, optim, 14) == pytest.approx(0.55)  # half-way through the cosine


def test_deepspeed_config_template_and_ours_win(tmp_path: Path) -> None:
    template = tmp_path / "ds.json"
    template.write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {"stage": 3, "overlap_comm": True,
                                                                                 "contiguous_gradients": False},
                                    "gradient_clipping": 7.0, "wall_clock_breakdown": True}))
    cfg = load_config(None, [f"zero.template={template}", "zero.stage=2", "train.global_batch_size=16",
                             "train.micro_batch_size=2", "optim.clip_grad=0.5", "zero.reduce_bucket_size=1000"])
    ds = deepspeed_config(cfg.train, cfg.optim, cfg.zero, dp_size=4)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    # Template fields we do not model stay; the overlap and bucket sizes are ours, so always recorded.
    assert ds["zero_optimization"] == {"stage": 2, "contiguous_gradients": False, "overlap_comm": False,
                                       "reduce_bucket_size": 1000, "allgather_bucket_size": 500_000_000}
    assert ds["gradient_clipping"] == 0.5 and ds["wall_clock_breakdown"] is True
    for name in ("zero1", "zero2", "zero3"):
        shipped = load_config(None, [f"zero.template={REPO / 'ds_configs' / (name + '.json')}"])
        assert deepspeed_config(shipped.train, shipped.optim, shipped.zero, 1)["zero_optimization"]["stage"] == shipped.zero.stage
    with pytest.raises(ConfigError, match="zero.template: .* not found"):
        bad = load_config(None, ["zero.template=/nope.json"])
        deepspeed_config(bad.train, bad.optim, bad.zero, 1)
