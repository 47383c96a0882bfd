"""The depth study's specs: every member of the CPU and GPU sweeps is a valid config; the CI-sized
spec runs and reports; the learning-rate rule picks the largest rate that trains."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mlra_mega.sweep import load_spec, members

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "configs" / "paper"


@pytest.mark.parametrize("spec,count,depths", [("cpu-depth.yaml", 45, {4, 8, 16}), ("gpu-depth.yaml", 45, {12, 24, 48}),
                                               ("cpu-lr-probe.yaml", 7, {4}), ("ci-depth.yaml", 4, {2, 4}),
                                               ("cpu-study.yaml", 36, {4, 16}),
                                               ("cpu-depth-llama.yaml", 45, {4, 8, 16})])
def test_every_member_is_a_valid_config(spec: str, count: int, depths: set[int]) -> None:
    grid = members(load_spec(PAPER / spec, overrides=[] if spec == "cpu-study.yaml" else ["optim.lr=0.004"]))
    assert len(grid) == count and {m.cfg.model.num_layers for m in grid} == depths
    assert len({m.cfg.run.dir for m in grid}) == count
    assert {m.cfg.model.arch for m in grid} == {"llama" if "llama" in spec else "gpt2"}


def test_cpu_and_gpu_profiles_keep_the_depth_ratios() -> None:
    cpu = members(load_spec(PAPER / "cpu-depth.yaml"))
    gpu = members(load_spec(PAPER / "gpu-depth.yaml"))
    assert sorted({m.cfg.model.num_layers for m in gpu}) == [3 * d for d in sorted({m.cfg.model.num_layers for m in cpu})]
    g = gpu[0].cfg.model
    assert (g.hidden_size, g.num_heads, g.seq_length) == (768, 12, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ci_sized_study_runs_and_reports(arch: str, tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    from mlra_mega.report import build_report
    from mlra_mega.sweep import run_sweep

    start = time.time()
    spec = load_spec(PAPER / "ci-depth.yaml", overrides=[f"data.tokenizer={tokenizer_dir}",
                                                         f"data.paths=[{sample_dataset}]", f"run.root={tmp_path}",
                                                         "data.split=98,2,0", f"model.arch={arch}"])
    assert {m.cfg.model.arch for m in members(spec)} == {arch}
    assert [o[1] for o in run_sweep(spec, log=lambda s: None)] == ["done at step 6"] * 4
    report = build_report("ci-depth", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "report", log=lambda s: None)
    text = report.read_text()
    for depth in (2, 4):
        for variant in ("vanilla", "mlra"):
            assert f"| {depth} | {variant} | 1 |" in text
    print(f"\n[paper] CI-sized study ({arch} blocks): 4 runs and the report in {time.time() - start:.1f}s")


def _probe_run(root: Path, lr: float, losses: list[float], spikes: int = 0) -> None:
    run = root / f"lr{lr}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr}}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "loss": x, "skipped_steps": 0, "loss_spikes": spikes}) + "\n"
        for i, x in enumerate(losses)))


def test_lr_rule_takes_the_largest_rate_that_trains(tmp_path: Path) -> None:
    falling = [6.0 - 0.02 * i for i in range(100)]
    _probe_run(tmp_path, 0.001, falling)
    _probe_run(tmp_path, 0.004, falling)
    _probe_run(tmp_path, 0.016, [6.0] * 50 + [float("nan")] * 50)  # diverged
    _probe_run(tmp_path, 0.008, falling, spikes=1)  # a spike counts as not training cleanly
    _probe_run(tmp_path, 0.032, [6.0 + 0.01 * i for i in range(100)])  # loss went up
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "paper_lr_rule.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "0.004", out.stderr


def _bracket():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_lr_bracket", REPO / "scripts" / "paper_lr_bracket.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lr_bracket_goes_up_until_two_rates_past_the_best() -> None:
    next_rate = _bracket().next_rate
    loss = {5e-4: 6.3, 1e-3: 5.9, 2e-3: 5.7, 4e-3: 5.8, 8e-3: float("inf"), 1.6e-2: 5.0}
    seen: dict[float, float] = {}
    while (lr := next_rate(seen)) is not None:
        seen[lr] = loss[lr]
    assert sorted(seen) == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]  # best 2e-3, two past it (one diverged): done


def test_lr_bracket_goes_down_when_the_start_is_already_too_high() -> None:
    next_rate = _bracket().next_rate
    loss = {1e-3: 6.0, 5e-4: 5.8, 2.5e-4: 5.7, 1.25e-4: 5.9, 6.25e-5: 6.1}
    seen: dict[float, float] = {}
    while (lr := next_rate(seen)) is not None:
        seen[lr] = loss[lr]
    assert sorted(seen) == [6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3]


def test_the_main_study_has_the_rates_and_seeds_of_its_design() -> None:
    grid = members(load_spec(PAPER / "cpu-study.yaml"))
    runs = {(m.labels["model.num_layers"], m.labels["variant"], m.labels["optim.lr"], m.labels["seed"]) for m in grid}
    assert (16, "mlra", 4e-3, 1) in runs and (16, "embed_ln", 4e-3, 0) not in runs and (4, "vanilla", 1e-3, 1) not in runs
    m = grid[0].cfg
    assert (m.train.steps, m.optim.warmup_steps, m.optim.min_lr_ratio, m.eval.iters) == (400, 40, 0.1, 0)
    assert m.train.global_batch_size // m.train.micro_batch_size >= 4  # the gradient variance needs 4


@pytest.mark.slow
def test_gpu_signal_dry_run_writes_each_run_and_resumes(tmp_path: Path, tokenizer_dir: Path, sample_dataset: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("signal", REPO / "scripts" / "paper_depth_gpu_signal.py")
    signal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(signal)
    args = ["--dry-run", "--out", str(tmp_path), "--tokenizer", str(tokenizer_dir), "--data", sample_dataset]
    start = time.time()
    assert signal.main(args) == 0
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(results) == 16 and {r["depth"] for r in results} == {1, 2}
    assert all(r["steps"] == 3 and r["val_ppl"] > 1 for r in results)
    out = capsys.readouterr().out
    assert "| 2 | 0.001 |" in out and "mlra / vanilla" in out
    print(f"\n[paper] GPU signal dry run: 16 runs in {time.time() - start:.1f}s")
    assert signal.main(args) == 0  # a rerun skips every finished run
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 16
