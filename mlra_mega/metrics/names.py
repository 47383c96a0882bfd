"""The names metrics are written under, one section per prefix, and the names of older runs.

MLflow's run page groups charts into one section per key prefix (the part before the first
`/`), so every metric is written as `<section>/<name>`:

- `train/`: loss, learning rate, gradient norm, consumed samples, skipped steps;
- `tev/`: TEV's mean and standard deviation, its jumps, its correlation with gradient variance;
- `eval/`: validation loss and perplexity, and the lm-eval tasks' numbers;
- `perf/`: step time, throughput, MFU, the data wait, peak memory;
- `stability/`: the per-layer gradient and parameter norms, residual variance, loss spikes,
  gradient variance;
- `comm/`: the communication ledger's bytes, calls and time per process group.

metrics.jsonl and MLflow get the same names. Runs written before the sections had flat names
(`loss`, `tev_mean`, `grad_norm/layer0`, ...): `normalize` renames a record of either kind,
and every reader of metrics.jsonl or of an MLflow run goes through it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FLAT", "SECTIONS", "normalize", "sectioned"]

SECTIONS = ("train", "tev", "eval", "perf", "stability", "comm")

# Flat names of runs before the sections -> the names written now.
FLAT = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "consumed_samples": "train/consumed_samples", "skipped_steps": "train/skipped_steps", "skipped": "train/skipped",
    "tev_mean": "tev/mean", "tev_std": "tev/std", "tev_jumps": "tev/jumps",
    "tev_gradvar_spearman": "tev/gradvar_spearman", "tev_gradvar_spearman_diff": "tev/gradvar_spearman_diff",
    "val_loss": "eval/loss", "val_ppl": "eval/ppl",
    "step_time_s": "perf/step_time_s", "tokens_per_s": "perf/tokens_per_s",
    "tflops_per_device": "perf/tflops_per_device", "mfu": "perf/mfu", "data_wait_s": "perf/data_wait_s",
    "loss_spike_score": "stability/loss_spike_score", "loss_spikes": "stability/loss_spikes",
    "grad_var": "stability/grad_var", "grad_var_embedding": "stability/grad_var_embedding",
}
_FLAT_PREFIXES = ("grad_norm/", "param_norm/", "resid_var/")  # per-layer families -> stability/


def sectioned(name: str) -> str:
    """The name a metric is written under now (a name already in a section is returned as it is)."""
    if name in FLAT:
        return FLAT[name]
    if name.startswith(_FLAT_PREFIXES):
        return f"stability/{name}"
    return name


def normalize(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record (metrics.jsonl line, summary, MLflow metrics) under today's names."""
    return {sectioned(k): v for k, v in record.items()}
