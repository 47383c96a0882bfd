"""bench/gpu.py without a GPU: its dry run through the same code path, and the air-gapped
node's install (the wheelhouse for Python 3.12, installed with no index beside a torch that must
stay as it is)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_checks_then_measures_both_models(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--tev-reps", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["correct"] is True and result["mode"] == "dry-run"
    assert result["tp_check"]["max_logit_diff"] <= 1e-5 and result["tp_check"]["max_grad_diff"] <= 1e-5
    assert len(result["tp_check"]["per_rank"]) == 2
    assert [m["model"] for m in result["models"]] == ["mlra", "mha"]
    for m in result["models"]:
        assert len(m["loss_fp32"]) == len(m["loss_bf16"]) == 3
        assert m["loss_fp32"] != m["loss_bf16"], "the bf16 run must really run in bf16"
        assert m["loss_max_rel_diff"] <= 2e-2 and m["tev_check_rel"] <= 1e-5
        assert m["tokens_per_s"] > 0 and m["timed_steps"] == 3 and m["mfu"] is None  # no peak on CPU
    lines = proc.stdout.strip().splitlines()
    assert "correctness: PASS" in lines[-2] and "tokens/s" in "\n".join(lines[-8:])


def _python312() -> str | None:
    """A Python 3.12 that runs (a pyenv shim may name one it will not run)."""
    found = [str(root / "bin" / "python3.12")
             for root in sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob("3.12*"))]
    for candidate in [*found, shutil.which("python3.12")]:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


def _fake_torch(site: Path, version: str) -> None:
    """A torch distribution record with no code: enough for pip to see torch as installed."""
    info = site / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (info / "INSTALLER").write_text("test\n")
    (info / "RECORD").write_text("")


@pytest.mark.skipif(_python312() is None, reason="no Python 3.12 interpreter on this machine")
def test_the_wheelhouse_installs_on_python_312_with_no_index(tmp_path: Path) -> None:
    wheels = tmp_path / "wheelhouse"
    build = subprocess.run(["bash", str(REPO / "scripts" / "gpu_wheelhouse.sh"), str(wheels)], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
    size = sum(f.stat().st_size for f in wheels.iterdir())
    assert size <= 64 * 2**20, f"{size / 2**20:.1f} MiB"
    names = sorted(f.name for f in wheels.iterdir())
    assert not any(n.startswith("torch-") for n in names)
    assert any(n.startswith("deepspeed-0.19.8-py3-none-any") for n in names), names

    venv = tmp_path / "node"
    subprocess.run([_python312(), "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    _fake_torch(site, "2.11.0")
    install = subprocess.run(["bash", str(REPO / "scripts" / "gpu_install.sh"), str(wheels)], cwd=REPO,
                             capture_output=True, text=True, timeout=900,
                             env={**{k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"},
                                  "PYTHON": str(py), "SKIP_IMPORT_CHECK": "1"})
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-5000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True).stdout
    versions = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed)}
    assert versions["torch"] == "2.11.0", "the node's torch must stay"
    assert versions["megatron-core"] == "0.16.1" and versions["deepspeed"] == "0.19.8"
    assert versions["mlra-mega"] == "0.1.0" and "mlflow" not in versions
