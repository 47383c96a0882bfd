"""`mlra-mega sweep SPEC.yaml`: a grid of training runs under one MLflow parent run.

A spec names a base config, overrides for every member, the axes and the seeds:

    name: depth-study            # the parent run; members go to <run.root>/<experiment>/<name>/<member>
    base: ../quickstart.yaml     # relative to the spec file
    overrides: [train.steps=200]
    axes:
      variant: [vanilla, mlra]   # the presets of mlra_mega.variants
      model.num_layers: [4, 8]   # any dotted config key
    seeds: [1, 2]                # or a count (seeds 0..N-1); --seeds N overrides it

`mlra-mega sweep SPEC.yaml section.key=value ...` adds overrides for every member (after the
spec's), e.g. a learning rate chosen by a rule before the sweep.

Every member is one run with its own run directory, a child of the parent run in one tracking
store (tags: sweep, variant, every axis, seed). Members whose run finished are skipped; an
interrupted one resumes from its checkpoint. Locally the members run one after another in this
process (under torchrun, every rank runs the same loop); with `--submit` each is handed to Slurm
instead, which needs a tracking server (several jobs must not share one SQLite file).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlra_mega.config import ConfigError, RunConfig, load_config, public_dict, read_yaml_document, with_values
from mlra_mega.variants import variant_settings

__all__ = ["set_aside_unresumable", "Member", "SweepSpec", "load_spec", "members", "run_sweep"]

_SHORT = {"variant": "", "model.num_layers": "L", "model.hidden_size": "d", "optim.lr": "lr"}


@dataclass
class SweepSpec:
    name: str
    base: Path | None
    overrides: list[str]
    axes: dict[str, list[Any]]
    seeds: list[int]
    path: Path
    # More grids of the same sweep, each with its own axes and seeds (the members are their union);
    # `axes` and `seeds` above are the first.
    more: list[tuple[dict[str, list[Any]], list[int]]] = field(default_factory=list)

    @property
    def grids(self) -> list[tuple[dict[str, list[Any]], list[int]]]:
        return [(self.axes, self.seeds), *self.more]


@dataclass
class Member:
    name: str
    labels: dict[str, Any]
    cfg: RunConfig


def load_spec(path: str | Path, seeds: int | None = None, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """The spec at `path`, checked; `seeds` (a count) replaces the spec's seeds; `overrides` go
    after the spec's (for every member)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("sweep", f"{path} not found", "give the path of a sweep spec YAML")
    data = read_yaml_document(path.read_text(encoding="utf-8", errors="replace"), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError("sweep", f"{path} holds a {type(data).__name__}, not a sweep spec",
                          "write name, base, overrides, axes and seeds as keys")
    unknown = set(data) - {"name", "base", "overrides", "axes", "seeds", "grids"}
    if unknown:
        raise ConfigError(f"sweep.{sorted(unknown)[0]}", "is not a sweep spec key",
                          "use name, base, overrides, axes, seeds (or grids: a list of {axes, seeds})")
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError("sweep.name", f"must be a non-empty name without '/', got {str(name)[:80]!r}",
                          "name the sweep, e.g. name: depth-study")
    base = (path.parent / data["base"]).resolve() if data.get("base") else None
    if base is not None and not base.is_file():
        raise ConfigError("sweep.base", f"{base} not found", "give the base config relative to the spec file")
    if "grids" in data:
        if "axes" in data or not isinstance(data["grids"], list) or not data["grids"]:
            raise ConfigError("sweep.grids", "must be a non-empty list of {axes, seeds}, and replaces axes",
                              "write either axes (and seeds) or grids: [{axes: {...}, seeds: N}, ...]")
        grids = []
        for i, grid in enumerate(data["grids"]):
            if not isinstance(grid, dict) or set(grid) - {"axes", "seeds"}:
                raise ConfigError(f"sweep.grids[{i}]", "must hold axes and seeds only", "e.g. {axes: {...}, seeds: 2}")
            grids.append(_grid(grid.get("axes"), seeds if seeds is not None else grid.get("seeds", data.get("seeds", 1)),
                               f"sweep.grids[{i}]."))
    else:
        grids = [_grid(data.get("axes"), seeds if seeds is not None else data.get("seeds", 1), "sweep.")]
    overrides = [*(str(x) for x in data.get("overrides") or []), *overrides]
    (axes, seed_list), *more = grids
    return SweepSpec(name, base, overrides, axes, seed_list, path, more)


def _grid(axes: Any, raw_seeds: Any, prefix: str) -> tuple[dict[str, list[Any]], list[int]]:
    axes = axes or {}
    if not isinstance(axes, dict) or not axes or any(not isinstance(v, list) or not v for v in axes.values()):
        raise ConfigError(f"{prefix}axes", f"must map each axis to a non-empty list, got {str(axes)[:200]}",
                          "e.g. axes: {variant: [vanilla, mlra], model.num_layers: [4, 8]}")
    seed_list = list(range(raw_seeds)) if isinstance(raw_seeds, int) and not isinstance(raw_seeds, bool) else raw_seeds
    if not isinstance(seed_list, list) or not seed_list or not all(isinstance(s, int) for s in seed_list):
        raise ConfigError(f"{prefix}seeds", f"must be a positive count or a list of integers, got {str(raw_seeds)[:80]!r}",
                          "e.g. seeds: 3, or seeds: [1, 2, 3]")
    return axes, seed_list


def members(spec: SweepSpec) -> list[Member]:
    """Every member of the grid with its resolved, validated config."""
    root_cfg = load_config(spec.base, spec.overrides)
    sweep_dir = Path(root_cfg.run.root) / root_cfg.tracking.experiment / spec.name
    out = []
    for axes, seeds in spec.grids:
        out.extend(_grid_members(root_cfg, spec, axes, seeds, sweep_dir))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError("sweep.grids", f"two grids both make member {dup}", "make the grids disjoint")
    return out


def _grid_members(root: RunConfig, spec: SweepSpec, axes: dict[str, list[Any]], seeds: list[int],
                  sweep_dir: Path) -> list[Member]:
    """Each member's config is the spec's base config with the member's values put in by dataclass
    replacement (checked against the fields' types, validated), not by re-parsing override text."""
    out = []
    keys = list(axes)
    for combo in itertools.product(*axes.values()):
        for seed in seeds:
            labels = dict(zip(keys, combo))
            name = "-".join(f"{_SHORT.get(k, k.rsplit('.', 1)[-1] + '_')}{v}" for k, v in labels.items()) + f"-s{seed}"
            cfg = with_values(root, {**{k: v for k, v in labels.items() if k != "variant"}, "train.seed": seed})
            if "variant" in labels:
                cfg = with_values(cfg, variant_settings(str(labels["variant"]), cfg.model))
            tags = [f"sweep={spec.name}", f"seed={seed}", *(f"{k}={v}" for k, v in labels.items())]
            cfg = with_values(cfg, {"run.dir": str(sweep_dir / name), "run.name": name, "tracking.tags": tags})
            out.append(Member(name, {**labels, "seed": seed}, cfg))
    return out


def set_aside_unresumable(run_dir: Path, lock_stale_s: float, log: Callable[[str], None]) -> Path | None:
    """A member interrupted before its first checkpoint cannot resume, and a run directory is never
    trained over: the sweep (which made the directory) keeps it as `<dir>.interrupted-N` and the
    member starts again. A member some live job holds is left alone (its training refuses)."""
    from mlra_mega.train.checkpoint import find_checkpoint
    from mlra_mega.train.run_lock import RunLock

    if not (run_dir / "metrics.jsonl").exists() or find_checkpoint(run_dir) is not None:
        return None
    lock = RunLock(run_dir, lock_stale_s, log=lambda s: None)
    lock.acquire()  # a ConfigError naming the holder when a live job has it
    lock.release()
    n = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.interrupted-{n}")).exists():
        n += 1
    run_dir.rename(aside)
    log(f"interrupted before its first checkpoint; kept as {aside.name}, starting it again")
    return aside


def finished(member: Member) -> bool:
    summary = Path(member.cfg.run.dir) / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("steps", 0) >= member.cfg.train.steps


def _parent_run(spec: SweepSpec, cfg: RunConfig) -> str:
    """The parent MLflow run of the sweep (found by name, else created)."""
    from mlflow.tracking import MlflowClient

    from mlra_mega.tracking.mlflow import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = None
        if not cfg.tracking.uri and tracking_uri(cfg).startswith("sqlite:"):
            location = (Path(cfg.run.root).resolve() / "mlartifacts" / cfg.tracking.experiment).as_uri()
        exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.sweep_parent = '{spec.name}'")
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=spec.name, tags={"sweep_parent": spec.name,
                                                              "sweep_spec": spec.path.read_text()[:5000]})
    return run.info.run_id


def run_sweep(spec: SweepSpec, *, submit: Callable[[Path], str] | None = None,
              log: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Runs (or, with `submit`, hands to Slurm) every member not yet finished: [(member, outcome)]."""
    from mlra_mega.distributed import launch_env
    from mlra_mega.tracking.mlflow import tracking_uri

    grid = members(spec)
    cfg = grid[0].cfg
    if submit is not None and cfg.tracking.enabled and not tracking_uri(cfg).startswith(("http://", "https://")):
        raise ConfigError("tracking.uri", f"{tracking_uri(cfg)} is a file store: the sweep's Slurm jobs would "
                          "write one SQLite file at once", "start an MLflow tracking server and give "
                          "tracking.uri=http://HOST:PORT (or MLFLOW_TRACKING_URI)")
    parent = _parent_run(spec, cfg) if cfg.tracking.enabled and launch_env().rank == 0 else None
    outcomes = []
    for i, member in enumerate(grid, 1):
        head = f"[sweep] {spec.name} {i}/{len(grid)} {member.name}"
        if finished(member):
            log(f"{head}: finished before, skipped")
            outcomes.append((member.name, "skipped"))
            continue
        member_cfg = with_values(member.cfg, {"tracking.parent_run_id": parent}) if parent else member.cfg
        if submit is not None:
            run_dir = Path(member_cfg.run.dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "member.yaml").write_text(yaml.safe_dump(public_dict(member_cfg), sort_keys=False))
            outcomes.append((member.name, submit(run_dir / "member.yaml")))
            log(f"{head}: {outcomes[-1][1]}")
            continue
        from mlra_mega.train.run import train

        set_aside_unresumable(Path(member_cfg.run.dir), member_cfg.faults.lock_stale_s, lambda s: log(f"{head}: {s}"))
        log(f"{head}: {'resuming' if (Path(member_cfg.run.dir) / 'metrics.jsonl').exists() else 'starting'}")
        history, _ = train(member_cfg, log=log)
        outcomes.append((member.name, f"done at step {history[-1].step}" if history else "done"))
    if parent is not None and submit is None:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking_uri(cfg)).set_terminated(parent, status="FINISHED")
    return outcomes
