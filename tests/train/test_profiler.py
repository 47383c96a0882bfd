"""`profile.start` / `profile.steps`: a torch profiler trace of exactly that step range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlra_mega.config import ConfigError, load_config
from tests.train.test_checkpoint import REPO, overrides


def _step_markers(trace: Path) -> list[str]:
    events = json.loads(trace.read_text())["traceEvents"]
    return sorted({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")})


def _train(run_dir: Path, tokenizer_dir: Path, dataset: str, *extra: str) -> list[str]:
    from mlra_mega.train.run import train

    lines: list[str] = []
    train(load_config(REPO / "configs" / "quickstart.yaml",
                      overrides(tokenizer_dir, dataset, run_dir, *extra, "tracking.enabled=false", "eval.interval=0")),
          log=lines.append)
    return lines


def test_the_trace_covers_the_chosen_steps_and_only_them(tmp_path: Path, tokenizer_dir: Path,
                                                         sample_dataset: str) -> None:
    run_dir = tmp_path / "run"
    lines = _train(run_dir, tokenizer_dir, sample_dataset, "train.steps=5", "profile.start=2", "profile.steps=2")
    trace = run_dir / "profile" / "rank00000.trace.json"
    assert _step_markers(trace) == ["ProfilerStep#2", "ProfilerStep#3"]
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert "aten::mm" in names and any(str(n).startswith("Optimizer.step") for n in names)
    table = (run_dir / "profile" / "rank00000.txt").read_text()
    assert "Self CPU" in table and "aten::mm" in table
    assert any("[profile] rank 0: steps 2-3" in line for line in lines)


def test_a_run_that_ends_inside_the_range_still_writes_its_trace(tmp_path: Path, tokenizer_dir: Path,
                                                                  sample_dataset: str) -> None:
    run_dir = tmp_path / "run"
    _train(run_dir, tokenizer_dir, sample_dataset, "train.steps=3", "profile.start=1", "profile.steps=10")
    assert _step_markers(run_dir / "profile" / "rank00000.trace.json") == [f"ProfilerStep#{i}" for i in (1, 2, 3)]


@pytest.mark.parametrize("override, field", [("profile.start=101", "profile.start"), ("profile.steps=0", "profile.steps"),
                                             ("profile.start=-1", "profile.start")])
def test_bad_profile_settings_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.steps=100", override])
    assert err.value.field == field
