"""The depth study's analysis, from the run directories of its sweep (metrics.jsonl: the ground truth).

`load_runs(sweep_dir)` reads every finished member (config.yaml and metrics.jsonl) into a
`StudyRun`; `study_tables(runs)` answers the study's questions in Markdown, each number with its
seed count:

    (A) MLRA's final validation perplexity over each baseline's at each rate and at each
        variant's best rate, and what each variant loses from lr* to the higher rates;
    (B) whether the MLRA / vanilla ratio changes from the shallowest to the deepest depth;
    (C) MLRA's TEV mean over each baseline's at 25 / 50 / 100% of training (Scaled Embed also
        with its effective TEV, sqrt(d) times the parameter's);
    (D) instability: loss spikes after warm-up (z against the trailing SPIKE_WINDOW steps above
        SPIKE_Z), the fraction of clipped steps, the largest gradient norm after warm-up,
        divergences; the residual-stream variance per layer at the last probe;
    (E) TEV against the embedding-gradient variance between runs (each run's final TEV mean
        against its mean gradient variance over the last 25% of steps) and within runs (Spearman
        of first differences).

`study_plots(runs, dir)` draws the series grouped by depth and rate (a panel per pair, a line per
variant), so a variant's behaviour at a high rate is not averaged with its behaviour at lr*.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlra_mega.metrics.names import normalize
from mlra_mega.metrics.stability import SpikeDetector, spearman

__all__ = ["SPIKE_WINDOW", "SPIKE_Z", "StudyRun", "load_runs", "study_plots", "study_tables", "variant_of"]

SPIKE_WINDOW, SPIKE_Z = 20, 4.0
FRACTIONS = (0.25, 0.5, 1.0)


def variant_of(cfg: dict) -> str:
    model = cfg["model"]
    if model["attention"] == "mlra":
        return "mlra"
    if model.get("qkv_init_std") is not None:
        return "mha_matched_init"
    return {"scaled": "scaled_embed", "layernorm": "embed_ln"}.get(model["embedding"], "vanilla")


@dataclass
class StudyRun:
    name: str
    variant: str
    depth: int
    lr: float
    seed: int
    hidden: int
    steps: int
    warmup: int
    clip: float
    loss: dict[int, float] = field(default_factory=dict)
    grad_norm: dict[int, float] = field(default_factory=dict)
    tev: dict[int, float] = field(default_factory=dict)
    grad_var: dict[int, float] = field(default_factory=dict)
    val_ppl: float = math.inf
    skipped: int = 0
    resid: dict[int, float] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return self.skipped > 0 or not math.isfinite(self.val_ppl) or any(not math.isfinite(v)
                                                                           for v in self.loss.values())

    def tev_at(self, fraction: float) -> float | None:
        if not self.tev:
            return None
        target = max(1, round(self.steps * fraction))
        return self.tev[min(self.tev, key=lambda s: abs(s - target))]

    def spikes_after_warmup(self) -> int:
        detector = SpikeDetector(SPIKE_WINDOW, SPIKE_Z, SPIKE_WINDOW)
        for step in sorted(self.loss):
            if step > self.warmup:
                detector.update(self.loss[step])
        return detector.spikes

    def clipped_fraction(self) -> float:
        norms = [v for v in self.grad_norm.values() if math.isfinite(v)]
        return sum(v > self.clip for v in norms) / len(norms) if norms and self.clip > 0 else 0.0

    def max_grad_norm_after_warmup(self) -> float | None:
        norms = [v for s, v in self.grad_norm.items() if s > self.warmup and math.isfinite(v)]
        return max(norms) if norms else None

    def late_grad_var(self) -> float | None:
        late = [v for s, v in self.grad_var.items() if s > 0.75 * self.steps and math.isfinite(v)]
        return statistics.fmean(late) if late else None

    def first_difference_spearman(self) -> float | None:
        steps = sorted(s for s in self.grad_var if s in self.tev)
        if len(steps) < 4:
            return None
        tev, var = [self.tev[s] for s in steps], [self.grad_var[s] for s in steps]
        return spearman([b - a for a, b in zip(tev, tev[1:])], [b - a for a, b in zip(var, var[1:])])


def load_runs(sweep_dir: Path) -> list[StudyRun]:
    """Every member of the sweep that reached its last step."""
    out = []
    for run_dir in sorted(p for p in Path(sweep_dir).iterdir() if (p / "metrics.jsonl").is_file()):
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        run = StudyRun(run_dir.name, variant_of(cfg), cfg["model"]["num_layers"], cfg["optim"]["lr"],
                       cfg["train"]["seed"], cfg["model"]["hidden_size"], cfg["train"]["steps"],
                       cfg["optim"]["warmup_steps"], cfg["optim"]["clip_grad"])
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            r = normalize(json.loads(line))  # the archived members have the flat names of their day
            step = r["step"]
            if "train/loss" in r:
                run.loss[step], run.grad_norm[step] = r["train/loss"], r["train/grad_norm"]
                run.skipped = r.get("train/skipped_steps", 0)
                if r.get("tev/mean") is not None:
                    run.tev[step] = r["tev/mean"]
                if "stability/grad_var_embedding" in r:
                    run.grad_var[step] = r["stability/grad_var_embedding"]
                layers = {int(k.rsplit("_", 1)[1]): v for k, v in r.items()
                          if k.startswith("stability/resid_var/layer_")}
                if layers:
                    run.resid = layers
            if "eval/ppl" in r and step == run.steps:
                run.val_ppl = r["eval/ppl"]
        if run.loss and max(run.loss) >= run.steps:
            out.append(run)
    return out


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _groups(runs: list[StudyRun]) -> dict[tuple[int, str, float], list[StudyRun]]:
    groups: dict[tuple[int, str, float], list[StudyRun]] = defaultdict(list)
    for r in runs:
        groups[r.depth, r.variant, r.lr].append(r)
    return groups


def _ppl(group: list[StudyRun]) -> float | None:
    """Mean final perplexity over seeds; None when a seed diverged (its perplexity means nothing)."""
    return None if any(r.diverged for r in group) else _mean([r.val_ppl for r in group])


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.4f}"


def study_tables(runs: list[StudyRun]) -> list[str]:
    g = _groups(runs)
    depths = sorted({r.depth for r in runs})
    variants = sorted({r.variant for r in runs}, key=lambda v: (v != "vanilla", v != "mlra", v))
    baselines = [v for v in variants if v != "mlra"]
    rates = sorted({r.lr for r in runs})
    lr_star = rates[0]
    out = ["## (A) Validation perplexity", "",
           "Mean final validation perplexity over seeds (n seeds); `diverged` when any seed diverged.", "",
           "| depth | variant | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | best rate |",
           "|---|---|" + "---|" * (len(rates) + 1)]
    best: dict[tuple[int, str], tuple[float, float]] = {}
    for d in depths:
        for v in variants:
            cells = []
            for lr in rates:
                group = g.get((d, v, lr), [])
                p = _ppl(group)
                cells.append("-" if not group else "diverged" if p is None else f"{p:.2f} (n={len(group)})")
                if p is not None and ((d, v) not in best or p < best[d, v][1]):
                    best[d, v] = (lr, p)
            best_rate = f"{best[d, v][0]:g}" if (d, v) in best else "-"
            out.append(f"| {d} | {v} | " + " | ".join(cells) + f" | {best_rate} |")
    out += ["", "MLRA's perplexity over each baseline's, at the same rate and at each one's best rate:", "",
            "| depth | baseline | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | best / best |",
            "|---|---|" + "---|" * (len(rates) + 1)]
    for d in depths:
        for b in baselines:
            cells = [_ratio(_ppl(g.get((d, "mlra", lr), [])) if g.get((d, "mlra", lr)) else None,
                            _ppl(g.get((d, b, lr), [])) if g.get((d, b, lr)) else None) for lr in rates]
            bb = _ratio(best.get((d, "mlra"), (0, None))[1], best.get((d, b), (0, None))[1])
            out.append(f"| {d} | {b} | " + " | ".join(cells) + f" | {bb} |")
    out += ["", f"What each variant loses from lr* = {lr_star:g} to the higher rates (perplexity at the rate over "
            "perplexity at lr*):", "", "| depth | variant | " + " | ".join(f"lr {lr:g}" for lr in rates[1:]) + " |",
            "|---|---|" + "---|" * (len(rates) - 1)]
    for d in depths:
        for v in variants:
            base = _ppl(g.get((d, v, lr_star), [])) if g.get((d, v, lr_star)) else None
            cells = [("diverged" if g.get((d, v, lr)) and _ppl(g[(d, v, lr)]) is None else
                      _ratio(_ppl(g[(d, v, lr)]) if g.get((d, v, lr)) else None, base)) for lr in rates[1:]]
            out.append(f"| {d} | {v} | " + " | ".join(cells) + " |")
    out += ["", "## (B) Does the MLRA / vanilla ratio change with depth?", "",
            "| lr | " + " | ".join(f"depth {d}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for lr in rates:
        cells = [_ratio(_ppl(g[(d, "mlra", lr)]) if g.get((d, "mlra", lr)) else None,
                        _ppl(g[(d, "vanilla", lr)]) if g.get((d, "vanilla", lr)) else None) for d in depths]
        out.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    out += ["", "## (C) TEV", "", "MLRA's TEV mean over each baseline's at 25 / 50 / 100% of training (means over "
            "seeds; Scaled Embed also with its effective TEV, sqrt(d) x the parameter's):", "",
            "| depth | lr | baseline | 25% | 50% | 100% |", "|---|---|---|---|---|---|"]
    for d in depths:
        for lr in rates:
            mlra = g.get((d, "mlra", lr))
            if not mlra:
                continue
            for b in baselines:
                group = g.get((d, b, lr))
                if not group:
                    continue
                rows = [(b, 1.0)] + ([("scaled_embed (effective)", math.sqrt(group[0].hidden))]
                                     if b == "scaled_embed" else [])
                for label, scale in rows:
                    theirs = [_mean([r.tev_at(f) for r in group]) for f in FRACTIONS]
                    cells = [_ratio(_mean([r.tev_at(f) for r in mlra]), None if t is None else scale * t)
                             for f, t in zip(FRACTIONS, theirs)]
                    out.append(f"| {d} | {lr:g} | {label} | " + " | ".join(cells) + " |")
    out += ["", "## (D) Instability", "",
            f"Loss spikes after warm-up (z > {SPIKE_Z:g} against the trailing {SPIKE_WINDOW} steps), the fraction "
            "of steps whose gradient norm exceeded the clip, the largest gradient norm after warm-up, and "
            "divergences (a non-finite loss, a skipped step or a non-finite validation loss); sums and maxima "
            "over seeds.", "",
            "| depth | variant | lr | seeds | spikes | clipped | max grad norm | diverged |", "|---|---|---|---|---|---|---|---|"]
    for (d, v, lr), group in sorted(g.items()):
        norms = [r.max_grad_norm_after_warmup() for r in group]
        out.append(f"| {d} | {v} | {lr:g} | {len(group)} | {sum(r.spikes_after_warmup() for r in group)} | "
                   f"{_fmt(_mean([r.clipped_fraction() for r in group]), 3)} | "
                   f"{_fmt(max((n for n in norms if n is not None), default=None), 3)} | "
                   f"{sum(r.diverged for r in group)} |")
    deepest = depths[-1]
    probed = [(v, g[(deepest, v, lr_star)]) for v in variants if g.get((deepest, v, lr_star))
              and g[(deepest, v, lr_star)][0].resid]
    if probed:
        layers = sorted(probed[0][1][0].resid)
        out += ["", f"Residual-stream variance after each layer at the last probe (depth {deepest}, lr {lr_star:g}, "
                "mean over seeds; layer 0 = the embedding):", "",
                "| variant | " + " | ".join(str(i) for i in layers) + " |", "|---|" + "---|" * len(layers)]
        for v, group in probed:
            out.append(f"| {v} | " + " | ".join(_fmt(_mean([r.resid.get(i) for r in group]), 3) for i in layers)
                       + " |")
    pairs = [(r.tev_at(1.0), r.late_grad_var()) for r in runs if not r.diverged]
    pairs = [(t, v) for t, v in pairs if t is not None and v is not None]
    between = spearman([t for t, _ in pairs], [v for _, v in pairs]) if pairs else None
    within = [r.first_difference_spearman() for r in runs]
    within = [x for x in within if x is not None]
    out += ["", "## (E) TEV and the embedding-gradient variance", "",
            f"- Between runs: Spearman of each run's final TEV mean with its mean embedding-gradient variance over "
            f"the last 25% of steps: {_fmt(between, 3)} over {len(pairs)} runs.",
            f"- Within runs, on first differences: mean {_fmt(_mean(within), 3)}"
            + (f" +- {statistics.pstdev(within):.3f}" if len(within) > 1 else "") + f" over {len(within)} runs."]
    return out


PLOTTED = (("loss", "training loss"), ("tev", "TEV mean"), ("grad_norm", "gradient norm (pre-clip)"))


def study_plots(runs: list[StudyRun], out_dir: Path) -> dict[str, tuple[int, int]]:
    """PNGs under `out_dir`, one per series (loss, TEV, gradient norm) and one of the residual
    variance per layer: a panel per (depth, rate), rows by depth and columns by rate, a line per
    variant (the mean over its seeds). Returns {file name: (rows, columns)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r.depth for r in runs})
    rates = sorted({r.lr for r in runs})
    variants = sorted({r.variant for r in runs})
    # One colour per variant in every panel: a panel with fewer variants must not reuse the
    # first colours of the cycle for other variants.
    colour = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    groups = _groups(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes: dict[str, tuple[int, int]] = {}

    def grid(title: str):
        fig, axes = plt.subplots(len(depths), len(rates), figsize=(4.2 * len(rates), 3.0 * len(depths)),
                                 squeeze=False, sharex=True)
        fig.suptitle(title)
        for i, depth in enumerate(depths):
            for j, lr in enumerate(rates):
                axes[i][j].set_title(f"depth {depth}, lr {lr:g}", fontsize=9)
        return fig, axes

    def finish(fig, axes, name: str) -> None:
        handles, labels = axes[0][0].get_legend_handles_labels()
        for row in axes:
            for ax in row:
                h, lab = ax.get_legend_handles_labels()
                handles += [x for x, y in zip(h, lab) if y not in labels]
                labels += [y for y in lab if y not in labels]
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
        fig.tight_layout(rect=(0, 0.06, 1, 0.96))
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        shapes[name] = (len(axes), len(axes[0]))

    for key, title in PLOTTED:
        fig, axes = grid(f"{title}, mean over seeds")
        for i, depth in enumerate(depths):
            for j, lr in enumerate(rates):
                for variant in variants:
                    members = groups.get((depth, variant, lr), [])
                    series = [getattr(m, key) for m in members if getattr(m, key)]
                    if not series:
                        continue
                    steps = sorted(set.intersection(*(set(s) for s in series)))
                    values = [statistics.fmean(s[t] for s in series) for t in steps]
                    axes[i][j].plot(steps, values, label=variant, linewidth=1, color=colour[variant])
                if key == "grad_norm":
                    axes[i][j].set_yscale("log")
        finish(fig, axes, f"{'tev_mean' if key == 'tev' else key}.png")

    fig, axes = grid("residual-stream variance per layer at the last probe, mean over seeds")
    for i, depth in enumerate(depths):
        for j, lr in enumerate(rates):
            for variant in variants:
                members = [m for m in groups.get((depth, variant, lr), []) if m.resid]
                if members:
                    layers = sorted(set.intersection(*(set(m.resid) for m in members)))
                    axes[i][j].plot(layers, [statistics.fmean(m.resid[k] for m in members) for k in layers],
                                    label=variant, marker=".", linewidth=1, color=colour[variant])
            axes[i][j].set_yscale("log")
    finish(fig, axes, "resid_var.png")
    return shapes
