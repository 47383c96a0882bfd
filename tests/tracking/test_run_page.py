"""The run page as people see it: MLflow's own UI rendered by headless Chromium (Debian's package),
for a run tracked by a real `mlflow server`. The link the run prints opens the model-training
view; its charts sit in one section per key prefix, none in the unsectioned default; the
"System metrics" tab has MLflow's system metrics."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mlra_mega.config import load_config
from mlra_mega.train.callbacks import Callback
from tests.tracking.test_mlflow import Server
from tests.train.test_checkpoint import overrides

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None,
                                 reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")]


class Pace(Callback):
    """Steps slow enough for the system-metrics sampler to log a few samples."""

    def on_step_end(self, trainer, metrics) -> None:
        time.sleep(0.3)


def page_text(url: str, *ready: str) -> str:
    """The text of the page once its scripts have run (virtual time: no fixed sleep). The charts
    are drawn as they scroll into view, which virtual time alone skipped in half the loads here:
    every compositor stage runs before a frame is drawn (24 of 24 loads drew them, 8 under load).
    A page without every `ready` pattern yet is loaded again, with more time, twice at most."""
    for budget in (20000, 40000, 80000):
        out = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              "--run-all-compositor-stages-before-draw", f"--virtual-time-budget={budget}",
                              "--window-size=1400,2400", "--dump-dom", url],
                             capture_output=True, text=True, timeout=240)
        body = out.stdout[out.stdout.find("<body"):]
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))
        if all(re.search(r, text) for r in ready):
            break
    return text


def test_the_run_page_opens_in_the_training_view_with_a_section_per_prefix(
        tmp_path: Path, tokenizer_dir: Path, sample_dataset: str, capsys: pytest.CaptureFixture) -> None:
    from mlra_mega.train.run import train

    server = Server(tmp_path)
    server.start()
    try:
        cfg = load_config(None, overrides(tokenizer_dir, sample_dataset, tmp_path / "run", "train.steps=10",
                                          "eval.interval=5", "eval.iters=1", "diagnostics.interval=5",
                                          f"tracking.uri={server.uri}", "metrics.system_metrics_interval_s=0.5"))
        train(cfg, [Pace()], log=lambda s: None)
        printed = re.findall(r"\[mlflow\] run page: (\S+)", capsys.readouterr().out)
        assert len(printed) == 1 and printed[0].startswith(server.uri), printed
        url = printed[0]
        assert url.endswith("/model-metrics?workflowType=machine_learning")

        charts = page_text(url, r"\(eval/loss\)")
        # The model-training view's navigation, not the GenAI one's (traces, evaluations).
        assert "Model registry" in charts and "Evaluation runs" not in charts, charts[:2000]
        sections = dict(re.findall(r"([a-z_/]+) \((\d+)\) Add chart", charts))
        for prefix in ("train", "tev", "eval", "perf"):
            assert int(sections.get(prefix, 0)) >= 2, (prefix, sections)
        assert {"stability/grad_norm", "stability/param_norm", "stability/resid_var"} <= set(sections), sections
        assert sections.get("Model metrics", "0") == "0" and "Model metrics (0)" in charts  # nothing left unsectioned
        # The first section's charts are drawn (the others as they scroll into view).
        assert re.search(r"\(eval/loss\)", charts), charts[:3000]

        system = page_text(url.replace("/model-metrics?", "/system-metrics?"), r"System metrics \(([4-9]|\d\d+)\)",
                           "cpu_utilization_percentage|system_memory_usage")
        found = re.search(r"System metrics \((\d+)\)", system)
        assert found and int(found.group(1)) >= 4, system[:2000]
        assert "cpu_utilization_percentage" in system or "system_memory_usage" in system, system[:2000]
    finally:
        server.stop()
