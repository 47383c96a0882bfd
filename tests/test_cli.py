"""The command line: one-line errors with exit status 2, and the quickstart smoke run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlra_mega.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_config_prints_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert main(["config", str(REPO / "configs" / "quickstart.yaml"), "model.num_layers=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["num_layers"] == 3 and printed["model"]["hidden_size"] == 64


@pytest.mark.parametrize("args,field", [
    (["config", "missing.yaml", "model.num_heads=5"], "config"),
    (["config", "model.num_heads=5"], "model.num_heads"),
])
def test_config_errors_exit_2_in_one_line(args: list[str], field: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlra-mega: error: {field}") and err.count("\n") == 1


def test_bad_override_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", str(REPO / "configs" / "quickstart.yaml"), "model.attention=mlr"]) == 2
    err = capsys.readouterr().err
    assert err == ("mlra-mega: error: model.attention: 'mlr' is not one of ['mha', 'mlra'] "
                   "(fix: use one of ['mha', 'mlra']; did you mean 'mlra'?)\n")


@pytest.mark.slow
def test_module_entry_point_exit_status_and_no_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "mlra_mega", "quickstart", "model.hiden_size=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "mlra-mega: error: model.hiden_size: unknown key (fix: did you mean 'model.hidden_size'?)")


def test_console_script_is_declared() -> None:
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mlra-mega"]
    assert script.value == "mlra_mega.cli:main"


@pytest.mark.slow
def test_quickstart_smoke_learns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quickstart", "train.steps=40", "train.log_interval=10", f"run.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    final = [line for line in out.splitlines() if line.startswith("[quickstart] final loss")]
    assert final, out
    loss, first = _losses(final[0])
    assert loss < first - 0.8  # 40 AdamW steps on the sample corpus: the loss must fall
    assert "TEV" in final[0]
    assert (tmp_path / "quickstart-data" / "sample.idx").is_file()
    uri = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert f"[quickstart] look at it in MLflow: mlflow ui --backend-store-uri {uri}" in out
    # The embedded MLflow store holds the run, with a loss and a TEV value for every step.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "tev/mean", "tev/std", "train/grad_norm", "perf/tokens_per_s"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, 41)), key
    assert client.get_metric_history(run.info.run_id, "eval/ppl")
    # A second run reuses the tokenizer and dataset rather than making them again.
    assert main(["quickstart", "train.steps=1", f"run.root={tmp_path}"]) == 0
    assert "[tokenizer]" not in capsys.readouterr().out
    # The quickstart in llama blocks (RMSNorm, SwiGLU, rotary, untied, grouped-query MLRA) learns too.
    assert main(["quickstart", "model.arch=llama", "model.num_kv_heads=2", "train.steps=40", "train.log_interval=10",
                 f"run.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "[quickstart] 2-layer mlra GPT in llama blocks" in out
    loss, first = _losses(next(line for line in out.splitlines() if line.startswith("[quickstart] final loss")))
    assert loss < first - 0.8


def _losses(line: str) -> tuple[float, float]:
    final = float(line.split("final loss ")[1].split()[0])
    first = float(line.split("(first ")[1].split(")")[0])
    return final, first


def test_dashed_overrides_work_like_dotted_ones(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert main(["config", str(REPO / "configs" / "quickstart.yaml"), "--train.steps=3", "--model.mlra.rank=8"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 3 and printed["model"]["mlra"]["rank"] == 8
    assert main(["config", "--train.stepz=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
