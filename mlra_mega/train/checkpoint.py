"""Checkpoints: DeepSpeed's shards plus our sidecar, a manifest, and an atomic `latest` pointer.

Layout of `<run dir>/checkpoints/`:

    step00000100/                  one checkpoint (a "tag")
      <DeepSpeed's files>          model / optimizer / scheduler shards of every rank
      model/tp00.pt ...            this TP rank's full parameters (DP rank 0 of each TP group
                                   writes it; ZeRO-3 rows gathered first): what export reads
      rng/rank00000.pt ...         every rank's RNG states (torch, numpy, python, megatron's tracker)
      sidecar.pt                   resolved config, data position, step, callback states (MLflow run
                                   id among them), package versions, layout; rank 0
      tokenizer/                   a copy of the tokenizer model and card
      manifest.json                every file above with its size; written last
    latest                         the tag of the newest complete checkpoint, replaced atomically

DeepSpeed's own non-atomic `latest` is not written (`save_latest=False`). A checkpoint counts
only when its manifest exists and every file in it has its recorded size. Sidecars and RNG files
hold plain types and tensors only; every file, DeepSpeed's included, is read by `safe_load`
(weights only: a checkpoint cannot run code).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mlra_mega.config import ConfigError, RunConfig, flatten, public_dict
from mlra_mega.errors import DataError
from mlra_mega.data.tokenizer import file_sha256
from mlra_mega.train.callbacks import Callback
from mlra_mega.train.safe_load import safe_load

__all__ = ["Checkpointer", "Checkpoint", "tag_for", "model_shard", "save_checkpoint", "find_checkpoint", "load_checkpoint", "check_compatible",
           "read_sidecar", "is_complete", "checkpoint_problem", "package_versions", "rng_state", "set_rng_state"]

LATEST = "latest"
MANIFEST = "manifest.json"
SIDECAR = "sidecar.pt"


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the tag directory

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def tag(self) -> str:
        return self.path.name


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("mlra_mega", "torch", "megatron-core", "deepspeed", "sentencepiece", "mlflow", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_shard(engine: Any) -> dict[str, torch.Tensor]:
    """This rank's parameters, whole (ZeRO-3: gathered over DP; a collective there)."""
    params = dict(engine.module.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().clone().cpu() for n, p in params.items()}
    return {n: p.detach().clone().cpu() for n, p in params.items()}


def _write_manifest(path: Path) -> None:
    files = {str(p.relative_to(path)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(path.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    os.replace(tmp, path / MANIFEST)


def checkpoint_problem(path: Path, verify_hashes: bool = False) -> str | None:
    """Why `path` is not a whole checkpoint (no manifest, a file missing, cut short or changed), or None."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "no manifest (the save did not finish)"
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']}"
        if verify_hashes and file_sha256(f) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    for needed, what in ((SIDECAR, SIDECAR), ("model/tp00.pt", "model/tp00.pt"), ("rng/", "the RNG states (rng/)")):
        if not any(name == needed or (needed.endswith("/") and name.startswith(needed)) for name in files):
            return f"its manifest does not list {what}"
    return None


def is_complete(path: Path, verify_hashes: bool = False) -> bool:
    """The manifest is there and every file it lists has its size (and, verified, its hash)."""
    return checkpoint_problem(path, verify_hashes) is None


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(engine: Any, root: Path, step: int, sidecar: dict[str, Any], *, is_main: bool,
                    dp_rank: int, tp_rank: int, tokenizer_dir: Path | None, keep: int) -> Checkpoint:
    """Writes checkpoint `step` under `root` on every rank; rank 0 then points `latest` at it."""
    tag = tag_for(step)
    path = root / tag
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    shard = model_shard(engine)
    rank = dist.get_rank() if dist.is_initialized() else 0
    (path / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path / "rng" / f"rank{rank:05d}.pt")
    if dp_rank == 0:
        (path / "model").mkdir(exist_ok=True)
        torch.save(shard, path / "model" / f"tp{tp_rank:02d}.pt")
    if is_main:
        torch.save(sidecar, path / SIDECAR)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, path / "tokenizer", dirs_exist_ok=True)
    if dist.is_initialized():
        dist.barrier()  # every shard is on disk before the manifest and the pointer
    if is_main:
        _write_manifest(path)
        _replace_text(root / LATEST, tag + "\n")
        complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and is_complete(p))
        kept = set(complete[-keep:])
        for old in root.iterdir():
            # Older than the newest kept one and not kept: pruned, remains of an interrupted save too.
            if old.is_dir() and old.name.startswith("step") and old not in kept and old.name < tag:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return Checkpoint(path)


def find_checkpoint(where: Path, verify_hashes: bool = False, log=None, before: int | None = None
                    ) -> Checkpoint | None:
    """The newest whole checkpoint at `where`: a tag dir, a checkpoints dir or a run dir
    (with `before`, the newest of a step below it).

    A checkpoint that is not whole (cut short, a file missing, with `verify_hashes` a byte
    changed) is reported through `log` and the one before it is used.
    """
    def whole(p: Path) -> bool:
        problem = checkpoint_problem(p, verify_hashes)
        if problem is not None and log is not None and (p / MANIFEST).exists():
            log(f"[checkpoint] {p} is not usable: {problem}; trying the one before")
        return problem is None

    if (where / MANIFEST).exists():
        return Checkpoint(where) if whole(where) else None
    root = where / "checkpoints" if (where / "checkpoints").is_dir() else where
    if not root.is_dir():
        return None
    tags = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step")), reverse=True)
    pointer = root / LATEST
    if pointer.is_file():
        # The pointer first; past a broken one, the newest whole checkpoint before it.
        named = root / pointer.read_text().strip()
        tags = [named] + [t for t in tags if t.name < named.name] if named.is_dir() else tags
    if before is not None:
        tags = [t for t in tags if t.name < tag_for(before)]
    for tag in tags:
        if whole(tag):
            return Checkpoint(tag)
    return None


def read_sidecar(ckpt: Checkpoint) -> dict[str, Any]:
    return safe_load(ckpt.path / SIDECAR)


def check_compatible(ckpt: Checkpoint, sidecar: dict[str, Any], cfg: RunConfig, tp: int, dp: int) -> None:
    """The checkpoint's model and layout are this run's, or a ConfigError naming what differs."""
    saved = {k: v for k, v in flatten(sidecar["config"]).items() if k.startswith("model.")}
    current = {k: v for k, v in flatten(cfg).items() if k.startswith("model.")}
    differ = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
              if saved.get(k) != current.get(k)]
    if differ:
        raise ConfigError("checkpoint", f"{ckpt.path} was made by a different model: {', '.join(differ)}",
                          "resume with the model config it was made with, or start a new run.dir")
    layout = sidecar["layout"]
    now = {"tensor": tp, "data": dp, "zero_stage": cfg.zero.stage}
    changed = [f"{k} {layout[k]} -> {now[k]}" for k in now if layout[k] != now[k]]
    if changed:
        raise ConfigError("checkpoint", f"{ckpt.path} was written at another layout: {', '.join(changed)}",
                          "resume with the same parallel.tensor, world size and zero.stage")


def load_checkpoint(engine: Any, ckpt: Checkpoint) -> None:
    """DeepSpeed's shards into the engine, and this rank's RNG states back."""
    load_path, _ = engine.load_checkpoint(str(ckpt.root), tag=ckpt.tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise ConfigError("checkpoint", f"DeepSpeed found nothing to load in {ckpt.path}",
                          "point --resume at a checkpoint written by this framework")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = ckpt.path / "rng" / f"rank{rank:05d}.pt"
    if not rng.is_file():
        raise ConfigError("checkpoint", f"{ckpt.path} has no RNG states for rank {rank} ({rng.name})",
                          "resume from a complete checkpoint of this layout")
    set_rng_state(safe_load(rng))


def sidecar_for(cfg: RunConfig, step: int, consumed_samples: int, callbacks: dict[str, Any], tp: int, dp: int,
                finished: bool) -> dict[str, Any]:
    return {"step": step, "consumed_samples": consumed_samples, "config": public_dict(cfg), "callbacks": callbacks,
            "versions": package_versions(), "layout": {"tensor": tp, "data": dp, "zero_stage": cfg.zero.stage},
            "finished": finished}


def _is_write_failure(exc: Exception) -> bool:
    """A full disk or a file system that refuses writes (torch's zip writer says it as a RuntimeError)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return "file write failed" in text or "failed writing" in text or "No space left" in text


class Checkpointer(Callback):
    """A checkpoint every `checkpoint.interval` steps and at the last step (put it last)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, tokenizer_dir: Path | None) -> None:
        self.cfg, self.root, self.tokenizer_dir = cfg, run_dir / "checkpoints", tokenizer_dir
        self.last: Checkpoint | None = None
        self.last_save_s: float | None = None  # how long the last save took (the SIGTERM budget test)

    def on_step_end(self, trainer: Any, metrics: Any) -> None:
        interval, t = self.cfg.checkpoint.interval, self.cfg.train
        if metrics.step in (t.steps, t.stop_at):
            self.save(trainer)
        elif interval and metrics.step % interval == 0 and not metrics.skipped:
            # Not on a skipped step: a rollback wants the checkpoints from before a run of them.
            self.save(trainer)

    def save(self, trainer: Any) -> Checkpoint:
        states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks}
        ctx = trainer.ctx
        sidecar = sidecar_for(self.cfg, trainer.step, trainer.batches.consumed_samples, states, ctx.tp_size,
                              ctx.dp_size, finished=trainer.step >= self.cfg.train.steps)
        start = time.perf_counter()
        try:
            self.last = save_checkpoint(trainer.engine, self.root, trainer.step, sidecar, is_main=ctx.is_main,
                                        dp_rank=ctx.dp_rank, tp_rank=ctx.tp_rank, tokenizer_dir=self.tokenizer_dir,
                                        keep=self.cfg.checkpoint.keep)
        except (OSError, RuntimeError) as exc:
            if not _is_write_failure(exc):
                raise
            kept = find_checkpoint(self.root)
            raise DataError(f"checkpoint: writing {tag_for(trainer.step)} under {self.root} failed ({exc}); "
                            + (f"{kept.tag} is still the latest complete checkpoint" if kept else
                               "there is no complete checkpoint yet")
                            + " (fix: free space or fix the file system there, then run again: --resume auto "
                            "continues from the latest complete checkpoint)") from None
        self.last_save_s = time.perf_counter() - start
        return self.last
