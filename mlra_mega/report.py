"""`mlra-mega report PARENT_RUN_OR_EXPERIMENT`: a Markdown report with plots, from the tracking store.

The target is a sweep's parent run (its id or the sweep's name), whose child runs are the
members, or an experiment name (every run in it with a loss). Members are grouped by variant and
depth (the `variant` tag or model.attention / model.embedding; model.num_layers); each group's
numbers are mean +- std over its seeds:

    final validation perplexity, final TEV mean and std, max gradient norm (finite steps),
    loss spikes, Spearman of TEV with the embedding gradient variance (raw, first differences)

Plots (PNG): TEV mean, loss and gradient norm against step (one panel per depth, one line per
variant, the mean over seeds), and the residual-stream variance against layer at the last
probed step. Everything is read back from MLflow, so a report can be rebuilt at any time; with
a parent run, the report and its plots are logged as its artifacts.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlra_mega.errors import ConfigError
from mlra_mega.metrics.names import FLAT, normalize

__all__ = ["Member", "build_report", "collect"]

SERIES = ("tev/mean", "train/loss", "train/grad_norm")
FINAL = ("eval/ppl", "tev/mean", "tev/std", "stability/loss_spikes", "train/skipped_steps", "tev/gradvar_spearman",
         "tev/gradvar_spearman_diff")
_OLD = {new: old for old, new in FLAT.items()}  # a run logged before the sections: its flat names


@dataclass
class Member:
    name: str
    variant: str
    depth: int
    seed: int
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    resid: dict[int, float] = field(default_factory=dict)


def _variant(run: Any) -> str:
    tags, params = run.data.tags, run.data.params
    if "variant" in tags:
        return tags["variant"]
    emb = {"scaled": "scaled_embed", "layernorm": "embed_ln"}.get(params.get("model.embedding", ""), "")
    if params.get("model.attention") == "mlra":
        return "mlra"
    if params.get("model.qkv_init_std") not in (None, "None"):
        return "mha_matched_init"
    return emb or "vanilla"


def _resolve(client: Any, target: str) -> tuple[Any | None, list[Any]]:
    """(parent run or None, member runs) for a run id, a sweep name or an experiment name."""
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(target)
    except MlflowException:
        parent = None
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments]
    if parent is None and ids:
        found = client.search_runs(ids, filter_string=f"tags.sweep_parent = '{target}'")
        parent = found[0] if found else None
    if parent is not None:
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        return parent, children
    exp = client.get_experiment_by_name(target)
    if exp is None:
        raise ConfigError("report", f"{target!r} is no run id, sweep name or experiment in this tracking store",
                          "give a sweep's parent run id or name, or an experiment name, and --tracking-uri")
    return None, [r for r in client.search_runs([exp.experiment_id])
                  if "train/loss" in r.data.metrics or "loss" in r.data.metrics]


def collect(client: Any, runs: list[Any]) -> list[Member]:
    out = []
    for run in runs:
        p = run.data.params
        m = Member(run.info.run_name, _variant(run), int(p.get("model.num_layers", 0)), int(p.get("train.seed", 0)))
        metrics = normalize(run.data.metrics)
        for key in SERIES:
            hist = (client.get_metric_history(run.info.run_id, key)
                    or client.get_metric_history(run.info.run_id, _OLD.get(key, key)))
            hist = sorted(hist, key=lambda x: (x.step, x.timestamp))
            by_step = {h.step: h.value for h in hist}  # the last value of a step run twice wins
            m.series[key] = sorted(by_step.items())
        for key in FINAL:
            if key in metrics:
                m.last[key] = metrics[key]
        finite = [v for _, v in m.series["train/grad_norm"] if math.isfinite(v) and v < 1e300]
        if finite:
            m.last["max_grad_norm"] = max(finite)
        for key, value in metrics.items():
            if key.startswith("stability/resid_var/layer_"):
                m.resid[int(key.rsplit("_", 1)[1])] = value
        out.append(m)
    return out


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.5g} +- {spread:.2g}"


def _table(members: list[Member]) -> list[str]:
    groups: dict[tuple[int, str], list[Member]] = defaultdict(list)
    for m in members:
        groups[m.depth, m.variant].append(m)
    cols = [("eval/ppl", "final val ppl"), ("tev/mean", "TEV mean"), ("tev/std", "TEV std"),
            ("max_grad_norm", "max grad norm"), ("stability/loss_spikes", "loss spikes"),
            ("tev/gradvar_spearman", "TEV~grad var (raw)"), ("tev/gradvar_spearman_diff", "TEV~grad var (diff)")]
    lines = ["| depth | variant | seeds | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for (depth, variant), group in sorted(groups.items()):
        cells = [_mean_std([m.last.get(k) for m in group]) for k, _ in cols]
        lines.append(f"| {depth} | {variant} | {len(group)} | " + " | ".join(cells) + " |")
    return lines


def _comparison(members: list[Member]) -> list[str]:
    """MLRA against each other variant, depth by depth: ratios of the seed means, and in how many
    seeds (paired by seed) MLRA is lower."""
    if not any(m.variant == "mlra" for m in members):
        return []
    lines = ["| depth | baseline | val ppl mlra / baseline | mlra lower ppl (seeds) | TEV mean mlra / baseline "
             "| mlra lower TEV (seeds) |", "|---|---|---|---|---|---|"]
    for depth in sorted({m.depth for m in members}):
        mlra = {m.seed: m for m in members if m.depth == depth and m.variant == "mlra"}
        for base in sorted({m.variant for m in members if m.depth == depth} - {"mlra"}):
            other = {m.seed: m for m in members if m.depth == depth and m.variant == base}
            cells = []
            for key in ("eval/ppl", "tev/mean"):
                pairs = [(mlra[s].last.get(key), other[s].last.get(key)) for s in sorted(set(mlra) & set(other))]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if not pairs:
                    cells += ["-", "-"]
                    continue
                ratio = statistics.fmean(a for a, _ in pairs) / statistics.fmean(b for _, b in pairs)
                cells += [f"{ratio:.4f}", f"{sum(a < b for a, b in pairs)} of {len(pairs)}"]
            lines.append(f"| {depth} | {base} | " + " | ".join(cells) + " |")
    return lines


def _instability(members: list[Member]) -> list[str]:
    skipped = [m for m in members if m.last.get("train/skipped_steps", 0) > 0]
    spiked = [m for m in members if m.last.get("stability/loss_spikes", 0) > 0]
    lines = [f"Runs with non-finite (skipped) steps: {len(skipped)} of {len(members)}"
             + (": " + ", ".join(f"{m.name} ({int(m.last['train/skipped_steps'])})" for m in skipped)
                if skipped else "."),
             f"Runs with loss spikes: {len(spiked)} of {len(members)}"
             + (": " + ", ".join(f"{m.name} ({int(m.last['stability/loss_spikes'])})" for m in spiked)
                if spiked else ".")]
    return lines


def _panels(n: int):
    """(pyplot, figure, axes row) with one panel per depth, off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(n, 1), figsize=(5 * max(n, 1), 3.6), squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_series(members: list[Member], key: str, path: Path) -> None:
    depths = sorted({m.depth for m in members})
    plt, fig, axes = _panels(len(depths))
    for ax, depth in zip(axes[0], depths):
        for variant in sorted({m.variant for m in members if m.depth == depth}):
            group = [m for m in members if m.depth == depth and m.variant == variant]
            per_step: dict[int, list[float]] = defaultdict(list)
            for m in group:
                for step, value in m.series.get(key, []):
                    if math.isfinite(value) and value < 1e300:
                        per_step[step].append(value)
            steps = sorted(per_step)
            ax.plot(steps, [statistics.fmean(per_step[s]) for s in steps], label=variant, linewidth=1)
        ax.set_title(f"{key}, {depth} layers")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def _plot_resid(members: list[Member], path: Path) -> None:
    depths = sorted({m.depth for m in members if m.resid})
    plt, fig, axes = _panels(len(depths))
    for ax, depth in zip(axes[0], depths):
        for variant in sorted({m.variant for m in members if m.depth == depth and m.resid}):
            group = [m for m in members if m.depth == depth and m.variant == variant and m.resid]
            layers = sorted(group[0].resid)
            ax.plot(layers, [statistics.fmean(m.resid.get(i, math.nan) for m in group) for i in layers],
                    marker="o", label=variant)
        ax.set_xticks(sorted({i for m in members if m.depth == depth for i in m.resid}))
        ax.set_yscale("log")
        ax.set_title(f"residual variance, {depth} layers")
        ax.set_xlabel("after layer (0 = embedding)")
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def build_report(target: str, tracking_uri: str | None, out: Path, log=print) -> Path:
    """Writes `out/report.md` and its plots; returns the report's path."""
    from mlflow.tracking import MlflowClient

    from mlra_mega.config import load_config
    from mlra_mega.tracking.mlflow import tracking_uri as default_uri

    uri = tracking_uri or default_uri(load_config())
    client = MlflowClient(tracking_uri=uri)
    parent, runs = _resolve(client, target)
    if not runs:
        raise ConfigError("report", f"{target!r} has no member runs with metrics in {uri}",
                          "run the sweep first, or check --tracking-uri")
    members = collect(client, runs)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for key in SERIES:
        name = {"tev/mean": "tev_mean", "train/loss": "loss", "train/grad_norm": "grad_norm"}[key] + ".png"
        _plot_series(members, key, out / name)
        plots.append(name)
    if any(m.resid for m in members):
        _plot_resid(members, out / "resid_var.png")
        plots.append("resid_var.png")
    title = parent.info.run_name if parent is not None else target
    lines = [f"# Report: {title}", "",
             f"{len(members)} runs from `{uri}`" + (f", children of run `{parent.info.run_id}`" if parent else "")
             + ". Each cell: mean +- std over seeds (population std; 0 with one seed).", "",
             *_table(members), ""]
    if any(m.variant == "mlra" for m in members):
        lines += ["## MLRA against each baseline", "", *_comparison(members), ""]
    lines += ["## Instability", "", *_instability(members), "", "## Plots", "",
              *(f"![{p[:-4]}]({p})" for p in plots), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    if parent is not None:
        for name in ["report.md", *plots]:
            client.log_artifact(parent.info.run_id, str(out / name), artifact_path="report")
    log(f"[report] {report} ({len(members)} runs, {len(plots)} plots)"
        + (f"; logged to run {parent.info.run_id}" if parent is not None else ""))
    return report
