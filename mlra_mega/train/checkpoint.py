"""Checkpoints: DeepSpeed's shards plus our sidecar, a manifest, and an atomic `latest` pointer.

Layout of `<run dir>/checkpoints/`:

    step00000100/                  one checkpoint (a "tag")
      <DeepSpeed's files>          model / optimizer / scheduler shards of every rank: the one copy
                                   of the weights; each model-states file also holds our record of
                                   its TP rank, stage and TP partition dims (`elastic.stage_meta`),
                                   so any layout can read it (`train/elastic.py`)
      rng/rank00000.pt ...         every rank's RNG states (torch, numpy, python, megatron's tracker)
      sidecar.pt                   the trainer's state (step, data position, non-finite counts,
                                   callback states by name: the MLflow run id among them), the
                                   resolved config, package versions, layout; rank 0
      tokenizer/                   a copy of the tokenizer model and card
      manifest.json                every file above with its size (and sha256 when
                                   checkpoint.verify=sha256), merged by rank 0 from each rank's
                                   digests of the files it wrote; written last
    latest                         the tag of the newest complete checkpoint, replaced atomically

DeepSpeed's own non-atomic `latest` is not written (`save_latest=False`). A checkpoint counts
only when its manifest exists and every file in it has its recorded size. With
`checkpoint.async` the files are written by a background thread per rank (`checkpoint_io`), and
the manifest and `latest` follow once every rank is done. Sidecars and RNG files hold plain types
and tensors only; every file, DeepSpeed's included, is read by `safe_load` (weights only: a
checkpoint cannot run code). A checkpoint of another layout is resharded on load (`elastic`).
"""

from __future__ import annotations

import json
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

from mlra_mega.config import CheckpointConfig, ConfigError, model_identity
from mlra_mega import distributed
from mlra_mega.distributed import ParallelContext
from mlra_mega.errors import DataError, MlraMegaError
from mlra_mega.files import atomic_write_text, file_sha256
from mlra_mega.model.pipeline import global_name, is_tied_copy, layer_offset
from mlra_mega.train import elastic
from mlra_mega.train.callbacks import Callback, Priority
from mlra_mega.train.checkpoint_io import MANIFEST, CheckpointFiles, merge_parts, write_part
from mlra_mega.train.safe_load import safe_load
from mlra_mega.zero import gathered

__all__ = ["Checkpointer", "Checkpoint", "tag_for", "model_shard", "model_file", "save_checkpoint", "find_checkpoint",
           "load_checkpoint", "read_sidecar", "is_complete", "checkpoint_problem", "package_versions", "rng_state",
           "set_rng_state"]

LATEST = "latest"
SIDECAR = "sidecar.pt"
ASYNC_TIMEOUT_S = 3600.0  # how long rank 0 waits for the other ranks' background writes
# After the barrier of a synchronous save every part is on disk; one still missing on rank 0 is a
# filesystem the ranks do not share (or one slow to show other hosts' files), not a slow writer.
SYNC_VISIBLE_TIMEOUT_S = 60.0


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
    """This rank's parameters, whole (ZeRO-3: gathered over DP; a collective there), under
    their PP=1 names; a pipeline stage's copy of the tied matrix is left out (the first stage's
    is the same). For diagnostics and tests: checkpoints do not write it (the weights are in
    DeepSpeed's files once)."""
    model = engine.module
    params = dict(model.named_parameters())
    offset = layer_offset(model)
    with gathered(params.values()):
        return {global_name(n, offset): p.detach().clone().cpu() for n, p in params.items()
                if not is_tied_copy(model, n)}


def model_file(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """The name, under model/, of a TP rank's (and stage's) parameter file in checkpoints written
    before the weights were kept once (still read by export)."""
    return f"tp{tp_rank:02d}.pt" if pp_size == 1 else f"tp{tp_rank:02d}-pp{pp_rank:02d}.pt"


def _write_manifest(path: Path) -> None:
    """A manifest of every file with its size and sha256, written in one process (tests use it
    to make a tampered checkpoint look whole)."""
    files = {str(p.relative_to(path)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(path.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(path / MANIFEST, json.dumps({"verify": "sha256", "files": files}, indent=1) + "\n")


def _manifest_files(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def hash_problem(path: Path, names: list[str], files: dict[str, Any]) -> str | None:
    """The first of `names` whose sha256 differs from the manifest's (those without one are skipped)."""
    for name in names:
        want = files[name].get("sha256")
        if want is not None and file_sha256(path / name) != want:
            return f"{name} does not match its sha256 in the manifest"
    return None


def checkpoint_problem(path: Path, verify_hashes: bool = False) -> str | None:
    """Why `path` is not a whole checkpoint (no manifest, a file missing, cut short or, with
    `verify_hashes`, changed where the manifest has its sha256), or None."""
    files = _manifest_files(path)
    if files is None:
        return "no manifest (the save did not finish)"
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']}"
    if verify_hashes:
        problem = hash_problem(path, sorted(files), files)
        if problem is not None:
            return problem
    wanted = ((lambda n: n == SIDECAR, SIDECAR),
              (lambda n: n.endswith("model_states.pt") or n.startswith(elastic.ELASTIC_DIR + "/")
               or n.startswith("model/"), "the model's files"),
              (lambda n: n.startswith("rng/") or n.startswith(elastic.ELASTIC_DIR + "/"), "the RNG states (rng/)"))
    for listed, what in wanted:
        if not any(listed(name) for name in files):
            return f"its manifest does not list {what}"
    return None


def is_complete(path: Path, verify_hashes: bool = False) -> bool:
    """The manifest is there and every file it lists has its size (and, verified, its hash)."""
    return checkpoint_problem(path, verify_hashes) is None


def _prune(root: Path, tag: str, keep: int) -> None:
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and is_complete(p))
    kept = set(complete[-keep:])
    for old in root.iterdir():
        # Older than the newest kept one and not kept: pruned, remains of an interrupted save too.
        if old.is_dir() and old.name.startswith("step") and old not in kept and old.name < tag:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(engine: Any, root: Path, step: int, sidecar: dict[str, Any], *, ctx: ParallelContext,
                    tokenizer_dir: Path | None, keep: int, verify: str = "size", background: bool = False,
                    kill_in_save: bool = False) -> Checkpoint:
    """Writes checkpoint `step` under `root` on every rank (a collective). At once: when it
    returns the manifest is written and `latest` points at it. With `background`, DeepSpeed's and
    our files are snapshotted and written by each rank's writer thread; rank 0's then merges the
    parts and moves `latest` (`engine.checkpoint_engine.wait()` waits for it)."""
    tag = tag_for(step)
    path = root / tag
    files: CheckpointFiles = engine.checkpoint_engine
    files.wait()  # a pending background save of this rank comes first
    if ctx.is_main and path.exists() and not is_complete(path):
        shutil.rmtree(path)  # the remains of an interrupted save of this step (stale parts among them)
    if dist.is_initialized():
        dist.barrier()
    files.asynchronous, files.kill_after_first_write, files.written = background, kill_in_save, []
    meta = elastic.stage_meta(engine, ctx.tp_rank, ctx.tp_size, ctx.pp_rank)
    engine.save_checkpoint(str(root), tag=tag, client_state={elastic.META: meta}, save_latest=False)
    (path / "rng").mkdir(parents=True, exist_ok=True)
    files.save(rng_state(), str(path / "rng" / f"rank{ctx.rank:05d}.pt"))
    if ctx.is_main:
        files.save(sidecar, str(path / SIDECAR))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, path / "tokenizer", dirs_exist_ok=True)
            files.written += [p for p in (path / "tokenizer").rglob("*") if p.is_file()]
    written = list(files.written)
    files.asynchronous = files.kill_after_first_write = False

    def publish() -> None:  # rank 0, once every part is there
        merge_parts(path, ctx.world_size, verify, ASYNC_TIMEOUT_S if background else SYNC_VISIBLE_TIMEOUT_S)
        atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, tag, keep)

    if background:
        def finish() -> None:
            write_part(path, ctx.rank, written, verify)
            if ctx.is_main:
                publish()

        files.submit(finish)
        return Checkpoint(path)
    write_part(path, ctx.rank, written, verify)
    if dist.is_initialized():
        dist.barrier()  # every rank's files and digests are on disk before the manifest and the pointer
    if ctx.is_main:
        publish()
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


def load_resharded(engine: Any, ckpt: Checkpoint, layout: dict[str, Any], ctx: ParallelContext, *, seed: int,
                   step: int) -> None:
    """A checkpoint of another layout into this engine: this rank's slice of every parameter's
    weights, fp32 master and AdamW moments (`elastic`); RNG states derived from (seed, step)."""
    model = engine.module
    offset = layer_offset(model)
    mine = {global_name(n, offset, tied_copy=is_tied_copy(model, n)) for n, _ in model.named_parameters()}
    state = elastic.read_state(ckpt.path, layout, tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, wanted=mine.__contains__)
    elastic.load_state(engine, state, ckpt.path)
    distributed.reseed(seed, step)


def _is_write_failure(exc: Exception) -> bool:
    """A full disk or a file system that refuses writes (torch's zip writer says it as a RuntimeError)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return "file write failed" in text or "failed writing" in text or "No space left" in text


class Checkpointer(Callback):
    """The run's checkpoints: finds, verifies, loads and saves them, and picks the rollback target.

    As a callback it saves every `checkpoint.interval` steps (not on a skipped step: a rollback
    wants the checkpoints from before a run of them), at the last step and at a step in which a
    callback requested a stop; it runs after every
    other callback of the step but the preemption guard, so every state it saves is final.
    """

    priority = Priority.CHECKPOINT
    name = "checkpointer"

    def __init__(self, section: CheckpointConfig, run_dir: Path, ctx: ParallelContext, *, config: dict[str, Any],
                 zero_stage: int, tokenizer_dir: Path | None, log=print) -> None:
        self.section, self.root, self.ctx, self.tokenizer_dir = section, run_dir / "checkpoints", ctx, tokenizer_dir
        self.run_dir = run_dir
        self.config = config  # the run's resolved config, credentials masked: what the sidecar keeps
        self.layout = {"tensor": ctx.tp_size, "data": ctx.dp_size, "zero_stage": zero_stage}
        if ctx.pp_size > 1:  # absent from checkpoints made before pipeline parallelism: 1
            self.layout["pipeline"] = ctx.pp_size
        self.log = log if ctx.is_main else (lambda s: None)
        self.seed = int(config.get("train", {}).get("seed", 0))
        self.kill_in_save_step = config.get("faults", {}).get("kill_in_save_step")
        self.engine: Any = None  # set at the first load or save: whose writer a wait() waits for
        self.last: Checkpoint | None = None
        self.last_save_s: float | None = None  # how long the last save at once took (the SIGTERM budget)
        self.last_stall_s: float | None = None  # how long the last save held the step loop

    # -- finding and verifying ---------------------------------------------------------------

    def find(self, where: Path | None = None, *, before: int | None = None) -> Checkpoint | None:
        """The newest whole checkpoint at `where` (default: this run's): every file's size, and
        with checkpoint.verify=sha256 its hash, each rank hashing its share (a collective then)."""
        self.wait()
        where = where or self.run_dir
        while True:
            ckpt = find_checkpoint(where, log=self.log, before=before)
            if ckpt is None or self.section.verify != "sha256":
                return ckpt
            problem = self._hash_problem(ckpt)
            if problem is None:
                return ckpt
            self.log(f"[checkpoint] {ckpt.path} is not usable: {problem}; trying the one before")
            if (where / MANIFEST).exists():
                return None
            before = int(ckpt.tag[len("step"):])

    def _hash_problem(self, ckpt: Checkpoint) -> str | None:
        """The first file whose sha256 differs, over every rank's share of the files (or None)."""
        files = _manifest_files(ckpt.path) or {}
        if not any("sha256" in e for e in files.values()):
            self.log(f"[checkpoint] checkpoint.verify=sha256, but {ckpt.tag} was saved with verify=size: "
                     "its files' sizes are checked, not their hashes")
            return None
        names = sorted(files)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        problems: list[str | None] = [hash_problem(ckpt.path, names[rank::world], files)]
        if world > 1:
            gathered_problems: list[list[str | None]] = [[] for _ in range(world)]
            dist.all_gather_object(gathered_problems, problems)
            problems = [p for ps in gathered_problems for p in ps]
        return next((p for p in problems if p is not None), None)

    def wait(self) -> None:
        """Until this rank's pending background save is on disk (rank 0: published)."""
        if self.engine is not None:
            self.engine.checkpoint_engine.wait()

    def resume_point(self, total_steps: int) -> tuple[Checkpoint | None, dict[str, Any] | None]:
        """(checkpoint, sidecar) to continue from, per `checkpoint.resume`, or (None, None)."""
        resume = self.section.resume
        if resume == "never":
            if (self.run_dir / "metrics.jsonl").exists():
                raise ConfigError("checkpoint.resume", f"is never, but {self.run_dir} already holds a run",
                                  "give a new run.dir, or use checkpoint.resume=auto to continue it")
            return None, None
        if resume == "auto":
            ckpt = self.find()
            if ckpt is None:
                self._refuse_to_start_over()
                return None, None
        else:
            ckpt = self.find(Path(resume))
            if ckpt is None:
                raise ConfigError("checkpoint.resume", f"no complete checkpoint at {resume}",
                                  "give a checkpoint directory, a run's checkpoints/ directory or a run directory")
        sidecar = read_sidecar(ckpt)
        self._check_compatible(ckpt, sidecar)
        if sidecar["step"] >= total_steps:
            raise ConfigError("checkpoint.resume", f"the run of {ckpt.path} already finished (step {sidecar['step']}, "
                              f"train.steps={total_steps})",
                              "start a new run.dir, or use checkpoint.resume=never with a new run.dir")
        return ckpt, sidecar

    def _refuse_to_start_over(self) -> None:
        """A run directory that holds a run but no usable checkpoint is never trained over from step 0."""
        root = self.root
        tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step")) if root.is_dir() else []
        if tags:
            problems = "; ".join(f"{t.name}: {checkpoint_problem(t, verify_hashes=True)}" for t in tags[-3:])
            raise ConfigError("checkpoint.resume", f"auto found no usable checkpoint in {root} ({problems})",
                              "resume from a good copy with --resume PATH, or start afresh with --resume never "
                              "and a new run.dir")
        if (self.run_dir / "metrics.jsonl").exists():
            raise ConfigError("checkpoint.resume", f"auto found {self.run_dir / 'metrics.jsonl'} but no checkpoint "
                              "to continue it from (the run stopped before its first checkpoint)",
                              "start afresh with --resume never and a new run.dir (or delete this one)")

    def _check_compatible(self, ckpt: Checkpoint, sidecar: dict[str, Any]) -> None:
        """The checkpoint's model is this run's, or a ConfigError naming what differs (its layout
        may differ: it is resharded)."""
        saved, current = model_identity(sidecar["config"]), model_identity(self.config)
        differ = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
                  if saved.get(k) != current.get(k)]
        if differ:
            raise ConfigError("checkpoint", f"{ckpt.path} was made by a different model: {', '.join(differ)}",
                              "resume with the model config it was made with, or start a new run.dir")

    def same_layout(self, sidecar: dict[str, Any]) -> bool:
        """The checkpoint was written at this run's layout (else it is resharded on load)."""
        def key(layout: dict[str, Any]) -> tuple:
            return (layout.get("tensor", 1), layout.get("pipeline", 1), layout.get("data"), layout.get("zero_stage"),
                    layout.get("format", "deepspeed"))

        return key(sidecar["layout"]) == key(self.layout)

    def rollback_target(self, counter: Any, bad_step: int, consumed_samples: int) -> Checkpoint:
        """The newest whole checkpoint from before the current run of skipped steps (`counter`, a
        NonFiniteCounter); an error if there is none, or if it is the one the last rollback went to."""
        found = self.find(before=counter.streak_start)
        if found is None:
            raise MlraMegaError(f"{counter.consecutive} non-finite steps in a row up to step {bad_step} "
                                "(train.max_consecutive_skips) and no checkpoint to roll back to; set "
                                "checkpoint.interval so there is one, or lower optim.lr")
        if found.tag == counter.rolled_back_to:
            raise MlraMegaError(f"the run went non-finite again right after rolling back to {found.path}; "
                                f"lower optim.lr or look at the data after {consumed_samples} samples")
        return found

    # -- loading and saving ------------------------------------------------------------------

    def load(self, engine: Any, ckpt: Checkpoint) -> dict[str, Any]:
        """The checkpoint into the run: at this layout DeepSpeed's shards and this rank's RNG
        states (bit for bit), at another one resharded; the sidecar (the trainer's state)."""
        self.engine = engine
        self.wait()
        sidecar = read_sidecar(ckpt)
        if self.same_layout(sidecar):
            load_checkpoint(engine, ckpt)
            return sidecar
        start = time.perf_counter()
        self.log(f"[checkpoint] resharding {elastic.describe_layout(sidecar['layout'])} -> "
                 f"{elastic.describe_layout(self.layout)} "
                 f"({ckpt.path})")
        load_resharded(engine, ckpt, sidecar["layout"], self.ctx, seed=self.seed, step=int(sidecar["step"]))
        self.log(f"[checkpoint] resharded in {time.perf_counter() - start:.1f} s; per-rank RNG states do not carry "
                 f"over to another layout: re-derived from (train.seed={self.seed}, step {sidecar['step']})")
        return sidecar

    def on_step_end(self, trainer: Any, metrics: Any) -> None:
        interval = self.section.interval
        # A stop requested earlier in this step (a callback of higher priority) is a last step too.
        if metrics.step in (trainer.total_steps, trainer.end_step) or trainer.stop_reason is not None:
            self.save(trainer)
        elif interval and metrics.step % interval == 0 and not metrics.skipped:
            self.save(trainer, background=self.section.async_)

    def on_fit_end(self, trainer: Any) -> None:
        self.wait()

    def save(self, trainer: Any, background: bool = False) -> Checkpoint:
        """Checkpoint of this step (after any pending background save); with `background` the
        files are written while training goes on and `latest` moves once every rank is done."""
        sidecar = {**trainer.state_dict(), "config": self.config, "versions": package_versions(),
                   "layout": self.layout, "finished": trainer.step >= trainer.total_steps}
        self.engine = trainer.engine
        start = time.perf_counter()
        try:
            self.wait()
            self.last = save_checkpoint(trainer.engine, self.root, trainer.step, sidecar, ctx=self.ctx,
                                        tokenizer_dir=self.tokenizer_dir, keep=self.section.keep,
                                        verify=self.section.verify, background=background,
                                        kill_in_save=self.kill_in_save_step == trainer.step)
        except (OSError, RuntimeError) as exc:
            if not _is_write_failure(exc):
                raise
            kept = find_checkpoint(self.root)
            raise DataError(f"checkpoint: writing {tag_for(trainer.step)} under {self.root} failed ({exc}); "
                            + (f"{kept.tag} is still the latest complete checkpoint" if kept else
                               "there is no complete checkpoint yet")
                            + " (fix: free space or fix the file system there, then run again: --resume auto "
                            "continues from the latest complete checkpoint)") from None
        if background:
            self.last_stall_s = time.perf_counter() - start
        else:
            self.last_save_s = self.last_stall_s = time.perf_counter() - start
        return self.last
