"""`mlra-mega evaluate`: perplexity of a text file, or lm-eval tasks, from a checkpoint or an export.

SOURCE is what `generate` takes (a checkpoint of any layout, a run directory, an `export-hf`
directory), loaded in one process. `--text FILE` prints `perplexity N` (rolling windows of the
model's sequence length, `mlra_mega.perplexity`); `--tasks A,B` runs lm-eval tasks and writes
their results as JSON, and for a checkpoint of a run tracked in MLflow also logs them in that
run as `eval/<task>/<metric>` at the checkpoint's step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mlra_mega.errors import ConfigError

__all__ = ["evaluate_tasks", "evaluate_text", "log_to_tracked_run", "source_lm"]


def _progress(label: str):
    def show(done: int, total: int) -> None:
        print(f"\r[evaluate] {label} {done}/{total} tokens", end="" if done < total else "\n",
              file=sys.stderr, flush=True)
    return show


def evaluate_text(source: str | Path, text: str | Path, stride: int | None = None, *, quiet: bool = False):
    """The text file's perplexity (a `Perplexity`) under the model of `source`."""
    from mlra_mega import distributed
    from mlra_mega.config import ParallelConfig
    from mlra_mega.generate import load_source
    from mlra_mega.perplexity import rolling_perplexity, text_token_ids

    distributed.setup(ParallelConfig(tensor=1), seed=0)
    try:
        src = load_source(source)
        ids = text_token_ids(text, src.tokenizer.encode, src.eod)
        window = src.seq_length
        result = rolling_perplexity(src.lm, ids, window, stride, progress=None if quiet else _progress("scored"))
    finally:
        distributed.teardown()
    if not quiet:
        print(f"[evaluate] {src.description}: {result.tokens} tokens in {result.windows} windows of "
              f"{window} (stride {stride or window})", file=sys.stderr)
        print(f"perplexity {result.value:.6f}", flush=True)
    return result


def source_lm(src):
    """lm-eval's LM over a loaded `generate.Source`."""
    from mlra_mega.lm_tasks import model_lm

    tok = src.tokenizer
    return model_lm(src.lm, tok.encode_one, tok.decode, src.eod, src.seq_length)


def evaluate_tasks(source: str | Path, tasks: list[str], include_path: str | Path | None = None,
                   output: str | Path | None = None, limit: int | None = None,
                   track: bool = True) -> dict[str, Any]:
    """lm-eval's results for `tasks`; JSON to `output` (else stdout); metrics to the tracked run."""
    from mlra_mega import distributed
    from mlra_mega.config import ParallelConfig
    from mlra_mega.generate import load_source
    from mlra_mega.lm_tasks import check_lm_eval, run_tasks, task_metrics

    check_lm_eval("--tasks")
    if not tasks:
        raise ConfigError("--tasks", "names no task", "give task names separated by commas")
    distributed.setup(ParallelConfig(tensor=1), seed=0)
    try:
        src = load_source(source)
        print(f"[evaluate] {src.description}: tasks {', '.join(tasks)}", file=sys.stderr)
        results = run_tasks(source_lm(src), tasks, include_path, limit)
    finally:
        distributed.teardown()
    metrics = task_metrics(results)
    summary = {"source": str(source), "step": src.step, "metrics": metrics,
               "results": results["results"], "n-samples": results.get("n-samples", {}),
               "config": {"tasks": tasks, "limit": limit}}
    text = json.dumps(summary, indent=2, default=str)
    if output is not None:
        Path(output).write_text(text + "\n")
        print(f"[evaluate] results in {output}", file=sys.stderr)
    else:
        print(text, flush=True)
    for name, value in metrics.items():
        print(f"[evaluate] {name} {value:.6g}", file=sys.stderr)
    if track and src.run is not None:
        log_to_tracked_run(src.run, metrics, src.step)
    return results


def log_to_tracked_run(run, metrics: dict[str, float], step: int) -> str | None:
    """Logs `metrics` at `step` in the MLflow run of the training run `run` (a `generate.TrackedRun`);
    the run id, or None when the run was not tracked."""
    import time

    from mlra_mega.tracking.mlflow import RUN_ID_FILE, store_uri

    id_file = run.dir / RUN_ID_FILE
    if not run.cfg.tracking.enabled or not id_file.is_file():
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    run_id = id_file.read_text().strip()
    uri = store_uri(run.cfg.tracking, run.cfg.run.root)
    ts = int(time.time() * 1000)
    MlflowClient(tracking_uri=uri).log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
    print(f"[evaluate] logged {len(metrics)} metrics at step {step} in MLflow run {run_id}", file=sys.stderr)
    return run_id
