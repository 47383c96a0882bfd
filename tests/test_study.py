"""The depth study's analysis on synthetic runs whose answers are known: ratios, best rates,
divergences, TEV ratios (Scaled Embed's effective TEV), instability counts and the correlations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mlra_mega.study import load_runs, study_plots, study_tables

STEPS, WARMUP, HIDDEN = 40, 4, 16


def write_run(root: Path, variant: str, depth: int, lr: float, seed: int, ppl: float, tev: float, *,
              spike_at: int | None = None, diverge: bool = False, grad: float = 0.5) -> None:
    attention = "mlra" if variant == "mlra" else "mha"
    embedding = {"scaled_embed": "scaled", "embed_ln": "layernorm"}.get(variant, "vanilla")
    cfg = {"model": {"num_layers": depth, "hidden_size": HIDDEN, "attention": attention, "embedding": embedding,
                     "qkv_init_std": None}, "optim": {"lr": lr, "warmup_steps": WARMUP, "clip_grad": 1.0},
           "train": {"seed": seed, "steps": STEPS}}
    run = root / f"L{depth}-{variant}-lr{lr:g}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for step in range(1, STEPS + 1):
        loss = 6.0 - 0.01 * step + 0.001 * (step % 3)
        if step == spike_at:
            loss += 5.0
        if diverge and step > 30:
            loss = math.nan
        r = {"step": step, "loss": loss, "grad_norm": grad * (2.5 if step % 10 == 0 else 1.0),
             "tev_mean": tev * step / STEPS, "skipped_steps": 0}
        if step % 2 == 0:
            r["grad_var_embedding"] = tev * step / STEPS * 10 + 0.01 * (step % 4)
        if step == STEPS:
            r.update({"resid_var/layer_00": 1.0, "resid_var/layer_01": 2.0})
        lines.append(json.dumps(r))
    lines.append(json.dumps({"step": STEPS, "val_loss": math.log(ppl), "val_ppl": ppl}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_the_study_tables_answer_with_the_known_numbers(tmp_path: Path) -> None:
    for seed in (0, 1):
        for depth in (4, 16):
            gap = 0.95 if depth == 4 else 0.9  # MLRA's advantage grows with depth
            write_run(tmp_path, "vanilla", depth, 1e-3, seed, 100.0, 0.02)
            write_run(tmp_path, "vanilla", depth, 2e-3, seed, 120.0, 0.03, spike_at=32)
            write_run(tmp_path, "mlra", depth, 1e-3, seed, 100.0 * gap, 0.01)
            write_run(tmp_path, "mlra", depth, 2e-3, seed, 90.0 * gap, 0.015)
            write_run(tmp_path, "scaled_embed", depth, 1e-3, seed, 110.0, 0.0025)
            write_run(tmp_path, "scaled_embed", depth, 2e-3, seed, 500.0, 0.0025, diverge=True)
    runs = load_runs(tmp_path)
    assert len(runs) == 24
    text = "\n".join(study_tables(runs))
    # (A) perplexities with seed counts, best rates, ratios at the same rate and best over best
    assert "| 16 | vanilla | 100.00 (n=2) | 120.00 (n=2) | 0.001 |" in text
    assert "| 16 | mlra | 90.00 (n=2) | 81.00 (n=2) | 0.002 |" in text
    assert "| 16 | scaled_embed | 110.00 (n=2) | diverged | 0.001 |" in text
    assert "| 16 | vanilla | 0.9000 | 0.6750 | 0.8100 |" in text  # 81 / 100 best over best
    assert "| 4 | vanilla | 1.2000 |" in text and "| 4 | scaled_embed | diverged |" in text  # loss from lr*
    # (B) the gap by depth
    assert "| 0.001 | 0.9500 | 0.9000 |" in text
    # (C) TEV ratios; Scaled Embed's effective TEV is sqrt(16) = 4 times its parameter's
    assert "| 16 | 0.001 | vanilla | 0.5000 | 0.5000 | 0.5000 |" in text
    assert "| 16 | 0.001 | scaled_embed | 4.0000 | 4.0000 | 4.0000 |" in text
    assert "| 16 | 0.001 | scaled_embed (effective) | 1.0000 | 1.0000 | 1.0000 |" in text
    # (D) one spike per seed after warm-up, 10% of steps clipped, max norm after warm-up, divergences
    assert "| 16 | vanilla | 0.002 | 2 | 2 | 0.100 | 1.250 | 0 |" in text
    assert "| 16 | scaled_embed | 0.002 | 2 | 0 | 0.100 | 1.250 | 2 |" in text
    assert "| vanilla | 1.000 | 2.000 |" in text
    # (E) TEV and gradient variance rise together between runs (positively) and within runs
    assert "over 20 runs" in text  # the diverged runs left out
    between = float(text.split("last 25% of steps: ")[1].split(" ")[0])
    assert between > 0.9


def test_unfinished_runs_are_left_out(tmp_path: Path) -> None:
    write_run(tmp_path, "vanilla", 4, 1e-3, 0, 100.0, 0.02)
    path = next(tmp_path.iterdir()) / "metrics.jsonl"
    path.write_text("\n".join(path.read_text().splitlines()[:10]) + "\n")
    assert load_runs(tmp_path) == []


def test_the_plots_have_a_panel_per_depth_and_rate(tmp_path: Path) -> None:
    import matplotlib.image

    for depth in (4, 16):
        for lr in (1e-3, 2e-3, 4e-3):
            write_run(tmp_path / "runs", "vanilla", depth, lr, 0, 100.0, 0.02)
        write_run(tmp_path / "runs", "mlra", depth, 1e-3, 0, 90.0, 0.01)
    shapes = study_plots(load_runs(tmp_path / "runs"), tmp_path / "plots")
    assert shapes == {name: (2, 3) for name in ("loss.png", "tev_mean.png", "grad_norm.png", "resid_var.png")}
    for name in shapes:
        height, width, _ = matplotlib.image.imread(tmp_path / "plots" / name).shape
        assert width > height  # three rate columns side by side, two depth rows


def test_a_variant_has_one_colour_in_every_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A panel that holds only some variants (vanilla alone at 4e-3) keeps each variant's colour."""
    import matplotlib.axes

    drawn: set[tuple[str, str]] = set()
    plot = matplotlib.axes.Axes.plot

    def recording(self, *args, **kwargs):
        drawn.add((kwargs.get("label"), kwargs.get("color")))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    for lr in (1e-3, 4e-3):
        write_run(tmp_path / "runs", "vanilla", 4, lr, 0, 100.0, 0.02)
    write_run(tmp_path / "runs", "mlra", 4, 1e-3, 0, 90.0, 0.01)
    study_plots(load_runs(tmp_path / "runs"), tmp_path / "plots")
    assert drawn == {("mlra", "C0"), ("vanilla", "C1")}


def test_the_archived_members_give_the_committed_tables(tmp_path: Path) -> None:
    """docs/results/paper-depth-cpu/tables.md is what the scripts make of the archived members."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    results = repo / "docs" / "results" / "paper-depth-cpu"
    sweep = tmp_path / "cpu-study"
    for argv in (["paper_study_archive.py", "restore", str(results / "members"), str(sweep)],
                 ["paper_study_report.py", str(sweep), "--out", str(tmp_path / "tables.md")]):
        proc = subprocess.run([sys.executable, str(repo / "scripts" / argv[0]), *argv[1:]], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    made = (tmp_path / "tables.md").read_text().splitlines()
    committed = (results / "tables.md").read_text().splitlines()
    assert made[0].startswith("36 finished runs of ") and "(0 unfinished left out)" in made[0]
    assert made[1:] == committed[1:]  # the first line names the sweep directory
