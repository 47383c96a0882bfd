"""Checkpoints: bit-exact resume at TP=2 x DP=2 ZeRO-2 with dropout, one MLflow run, refusals,
integrity (checkpoint.verify=size catches a file cut short, sha256 a flipped byte), and Hugging
Face export from TP=2 and ZeRO-3 checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlra_mega.config import ConfigError, load_config
from mlra_mega.train.checkpoint import find_checkpoint, is_complete, read_sidecar
from mlra_mega.train.safe_load import safe_load

pytestmark = pytest.mark.slow  # every test here launches processes

REPO = Path(__file__).resolve().parents[2]
TRAINING_KEYS = ("train/loss", "train/lr", "train/grad_norm", "tev/mean", "tev/std", "train/consumed_samples")  # not timings
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=32",
        "model.attention=mlra", "train.global_batch_size=8", "train.micro_batch_size=2", "optim.lr=1e-3",
        "metrics.tev_interval=1", "eval.interval=0"]


def overrides(tokenizer_dir: Path, dataset: str, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.tokenizer={tokenizer_dir}", f"data.paths=[{dataset}]", f"run.dir={run_dir}",
            f"run.root={run_dir.parent}", *extra]


def torchrun(nproc: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mlra_mega", "train", str(REPO / "configs" / "quickstart.yaml"), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def steps(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, sample_dataset: str):
    """(straight run dir, stopped-and-resumed run dir), both TP=2 x DP=2 ZeRO-2 with dropout 0.1."""
    root = tmp_path_factory.mktemp("resume")
    common = ["parallel.tensor=2", "zero.stage=2", "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
              "train.steps=10", "checkpoint.interval=5", "optim.warmup_steps=2"]
    straight, resumed = root / "straight", root / "resumed"
    torchrun(4, overrides(tokenizer_dir, sample_dataset, straight, *common))
    torchrun(4, overrides(tokenizer_dir, sample_dataset, resumed, *common, "train.stop_at=5"))
    assert [r["step"] for r in steps(resumed)] == [1, 2, 3, 4, 5]
    torchrun(4, overrides(tokenizer_dir, sample_dataset, resumed, *common))  # a fresh process: resume auto
    return straight, resumed


def test_resumed_run_equals_the_straight_run_bit_for_bit(resumed_runs) -> None:
    straight, resumed = resumed_runs
    a, b = steps(straight), steps(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        for key in TRAINING_KEYS:
            assert ra[key] == rb[key], f"step {ra['step']}: {key} {ra[key]!r} != {rb[key]!r}"
    assert len({r["train/loss"] for r in a}) == 10  # dropout on, weights moving: ten different losses


def test_resumed_run_is_one_mlflow_run_with_every_step_once(resumed_runs) -> None:
    from mlflow.tracking import MlflowClient

    straight, resumed = resumed_runs
    client = MlflowClient(tracking_uri=f"sqlite:///{resumed.parent.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"straight", "resumed"}
    run = runs["resumed"]
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/grad_norm", "tev/mean", "train/lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, 11)), key
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert loss == {r["step"]: r["train/loss"] for r in steps(resumed)}
    assert read_sidecar(find_checkpoint(resumed))["callbacks"]["mlflow"]["run_id"] == run.info.run_id
    assert run.data.params["model.attention"] == "mlra" and run.data.tags["layout"] == "tp2xdp2"


def test_checkpoint_layout_and_integrity(resumed_runs) -> None:
    _, resumed = resumed_runs
    root = resumed / "checkpoints"
    assert (root / "latest").read_text().strip() == "step00000010"
    tag = root / "step00000010"
    assert is_complete(tag)
    assert not (tag / "model").exists()  # the weights are in DeepSpeed's files only
    assert sorted(p.name for p in tag.glob("mp_rank_*")) == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    assert len(list((tag / "rng").iterdir())) == 4
    rngs = [torch.load(p, weights_only=True) for p in sorted((tag / "rng").iterdir())]
    assert not torch.equal(rngs[0]["tracker"]["model-parallel-rng"], rngs[1]["tracker"]["model-parallel-rng"])
    sidecar = read_sidecar(find_checkpoint(tag))  # weights_only=True
    assert sidecar["step"] == 10 and sidecar["consumed_samples"] == 80 and sidecar["finished"] is True
    assert sidecar["layout"] == {"tensor": 2, "data": 2, "zero_stage": 2}
    assert (tag / "tokenizer" / "tokenizer.model").is_file() and "torch" in sidecar["versions"]


def _export_and_compare(ckpt_dir: Path, out: Path, tokenizer_dir: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlra_mega import distributed
    from mlra_mega.cli import main
    from mlra_mega.config import ParallelConfig
    from mlra_mega.data.tokenizer import load_tokenizer
    from mlra_mega.export import load_checkpoint_model

    assert main(["export-hf", str(ckpt_dir), str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(tokenizer_dir)
    texts = ["Return the number of items in a container.", "  two  spaces\nand a newline \u2603"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == ours.encode([text])[0]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    distributed.setup(ParallelConfig(tensor=1), seed=0)
    try:
        model, cfg, _ = load_checkpoint_model(ckpt_dir)
        ids = torch.tensor([ours.encode([texts[0]])[0]])
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        with torch.no_grad():
            return (model(ids, positions, None) - hf(ids).logits).abs().max().item()
    finally:
        distributed.teardown()


def test_export_from_a_tp2_checkpoint(resumed_runs, tmp_path: Path, tokenizer_dir: Path) -> None:
    _, resumed = resumed_runs
    assert _export_and_compare(resumed, tmp_path / "hf", tokenizer_dir) <= 1e-5


def test_export_from_a_zero3_checkpoint(tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    run = tmp_path / "z3"
    torchrun(2, overrides(tokenizer_dir, sample_dataset, run, "zero.stage=3", "train.steps=3",
                          "model.tie_embeddings=false"))
    ckpt = find_checkpoint(run)
    assert read_sidecar(ckpt)["layout"]["zero_stage"] == 3
    # Saved without gathering: the module in each rank's model states holds no weights (ZeRO-3's
    # placeholders), each rank's optimizer file holds its own half of the fp32 state.
    for f in ckpt.path.glob("zero_pp_rank_*_model_states.pt"):
        module = safe_load(f)["module"]
        assert module and all(t.numel() == 0 for t in module.values() if isinstance(t, torch.Tensor)), f.name
    sizes = [f.stat().st_size for f in sorted(ckpt.path.glob("zero_pp_rank_*_optim_states.pt"))]
    assert len(sizes) == 2 and abs(sizes[0] - sizes[1]) < 0.01 * sizes[0]
    assert _export_and_compare(run, tmp_path / "hf", tokenizer_dir) <= 1e-5


def _train(tokenizer_dir: Path, dataset: str, run_dir: Path, *extra: str, log=lambda s: None):
    from mlra_mega.train.run import train

    return train(load_config(None, overrides(tokenizer_dir, dataset, run_dir, "tracking.enabled=false", *extra)),
                 log=log)


def test_refusals(tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    run = tmp_path / "run"
    _train(tokenizer_dir, sample_dataset, run, "train.steps=4", "train.stop_at=2")
    with pytest.raises(ConfigError, match=r"different model: model.hidden_size 64 -> 128, model.num_heads"):
        _train(tokenizer_dir, sample_dataset, run, "train.steps=4", "model.hidden_size=128", "model.num_heads=8")
    with pytest.raises(ConfigError, match=r"checkpoint.resume: is never, but .* already holds a run"):
        _train(tokenizer_dir, sample_dataset, run, "train.steps=4", "checkpoint.resume=never")
    history, _ = _train(tokenizer_dir, sample_dataset, run, "train.steps=4")
    assert [m.step for m in history] == [3, 4]
    with pytest.raises(ConfigError, match="already finished"):
        _train(tokenizer_dir, sample_dataset, run, "train.steps=4")
    with pytest.raises(ConfigError, match="no complete checkpoint at"):
        _train(tokenizer_dir, sample_dataset, tmp_path / "other", f"checkpoint.resume={tmp_path / 'nothing'}")


def test_incomplete_checkpoints_are_skipped_and_keep_prunes(tmp_path: Path, tokenizer_dir: Path,
                                                            sample_dataset: str) -> None:
    run = tmp_path / "run"
    _train(tokenizer_dir, sample_dataset, run, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep=2",
           "train.stop_at=4")
    root = run / "checkpoints"
    (root / "step00000003").mkdir()  # the remains of a save that never finished
    (root / "step00000003" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    _train(tokenizer_dir, sample_dataset, run, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep=2")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000004", "step00000006"]
    # A shard cut short (a crash mid-write): the newest is no longer whole; the pointer is not trusted.
    shard = root / "step00000006" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    assert not is_complete(root / "step00000006")
    assert find_checkpoint(run).tag == "step00000004"
    (root / "latest").unlink()
    assert find_checkpoint(run).tag == "step00000004"


def test_a_flipped_byte_is_caught_and_the_previous_checkpoint_used(tmp_path: Path, tokenizer_dir: Path,
                                                                   sample_dataset: str) -> None:
    """checkpoint.verify=sha256: each rank hashes what it wrote, the resume checks the hashes."""
    run = tmp_path / "run"
    sha = "checkpoint.verify=sha256"
    _train(tokenizer_dir, sample_dataset, run, "train.steps=6", "checkpoint.interval=2", "train.stop_at=4", sha)
    shard = run / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit changed
    shard.write_bytes(bytes(data))
    assert is_complete(shard.parent) and not is_complete(shard.parent, verify_hashes=True)
    said: list[str] = []
    assert find_checkpoint(run, verify_hashes=True, log=said.append).tag == "step00000002"
    assert "does not match its sha256" in said[0]
    said.clear()
    history, _ = _train(tokenizer_dir, sample_dataset, run, "train.steps=6", sha, log=said.append)  # from step 2
    assert [m.step for m in history] == [3, 4, 5, 6]
    assert any("step00000004 is not usable" in line and "sha256" in line for line in said), said


def test_tracking_off_runs_without_mlflow(tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    """With MLflow made unimportable, a tracking.enabled=false run trains and writes no store.

    (DeepSpeed's autotuner tries `import mlflow` on its own and copes with its absence.)
    """
    args = overrides(tokenizer_dir, sample_dataset, tmp_path / "r", "train.steps=1", "tracking.enabled=false")
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'mlflow': raise ImportError('mlflow blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from mlra_mega.config import load_config\nfrom mlra_mega.train.run import train\n"
            f"train(load_config(None, {args!r}), log=print)\n"
            "print('mlflow imported' if any(m.split('.')[0] == 'mlflow' for m in sys.modules) else 'no mlflow')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "no mlflow"
    assert not (tmp_path / "mlflow.db").exists() and (tmp_path / "r" / "metrics.jsonl").is_file()
