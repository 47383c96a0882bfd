"""How checkpoint files are written and read: DeepSpeed's checkpoint engine for this package,
the background writer of `checkpoint.async`, and the per-rank digests the manifest is made from.

`CheckpointFiles` is the engine DeepSpeed calls for every checkpoint file (its pluggable
`CheckpointEngine`): reads go through `safe_load` (weights only), writes happen at once or, in
async mode, as a CPU snapshot handed to one background thread per rank while training goes on.
It remembers the files this rank wrote, so each rank sizes (and with `checkpoint.verify=sha256`
hashes) only its own files, in parallel with the others, and writes them to `parts/rankNNNNN.json`.
Rank 0 merges the parts into `manifest.json` once all of them exist; only then does `latest`
move. A crash before that leaves the checkpoint without a manifest, so it is never used.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mlra_mega.errors import MlraMegaError
from mlra_mega.files import atomic_write_text, file_sha256
from mlra_mega.train.safe_load import safe_load

__all__ = ["CheckpointFiles", "snapshot", "write_part", "merge_parts", "PARTS", "MANIFEST"]

PARTS = "parts"
MANIFEST = "manifest.json"


def _cpu_copy(tensor: torch.Tensor, reuse: Any) -> torch.Tensor:
    tensor = tensor.detach()
    if (isinstance(reuse, torch.Tensor) and reuse.shape == tensor.shape and reuse.dtype == tensor.dtype
            and reuse.device.type == "cpu"):
        return reuse.copy_(tensor)
    # Pinned host memory makes the device-to-host copy of a GPU tensor a direct DMA.
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda)
    return out.copy_(tensor)


def snapshot(obj: Any, reuse: Any = None) -> Any:
    """A copy that training cannot change: every tensor copied to CPU memory, the rest deep-copied.
    `reuse`, the snapshot of the same file at the previous save (its write finished), lends its
    tensors as buffers where shapes and dtypes match: copying into memory already mapped costs a
    fraction of allocating and first touching gigabytes again at every save."""
    if isinstance(obj, torch.Tensor):
        return _cpu_copy(obj, reuse)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = snapshot(v, reuse.get(k) if isinstance(reuse, dict) else None)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        same = isinstance(reuse, type(obj)) and len(reuse) == len(obj)
        return type(obj)(snapshot(v, reuse[i] if same else None) for i, v in enumerate(obj))
    return copy.deepcopy(obj)


def _entry(path: Path, verify: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"size": path.stat().st_size}
    if verify == "sha256":
        entry["sha256"] = file_sha256(path)
    return entry


def write_part(tag_dir: Path, rank: int, files: list[Path], verify: str) -> None:
    """This rank's files (relative to the checkpoint) with their sizes and, verified, hashes."""
    entries = {str(f.relative_to(tag_dir)): _entry(f, verify) for f in sorted(set(files))}
    (tag_dir / PARTS).mkdir(exist_ok=True)
    atomic_write_text(tag_dir / PARTS / f"rank{rank:05d}.json", json.dumps({"files": entries}) + "\n")


def merge_parts(tag_dir: Path, world_size: int, verify: str, timeout_s: float) -> None:
    """Rank 0: waits for every rank's part, then writes the manifest (the checkpoint now counts)."""
    parts = [tag_dir / PARTS / f"rank{r:05d}.json" for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    while not all(p.is_file() for p in parts):
        if time.monotonic() > deadline:
            missing = [p.name for p in parts if not p.is_file()]
            raise MlraMegaError(f"checkpoint {tag_dir.name}: {len(missing)} rank(s) did not finish writing within "
                                f"{timeout_s:.0f} s ({', '.join(missing[:4])} missing in {tag_dir / PARTS}); it is left "
                                "without a manifest and the previous checkpoint stays the latest. Every rank "
                                "must write checkpoint.dir on one filesystem that all of them see")
        time.sleep(0.05)
    files: dict[str, Any] = {}
    for p in parts:
        files.update(json.loads(p.read_text())["files"])
    atomic_write_text(tag_dir / MANIFEST, json.dumps({"verify": verify, "files": dict(sorted(files.items()))},
                                                     indent=1) + "\n")
    for p in parts:
        p.unlink()
    (tag_dir / PARTS).rmdir()


class CheckpointFiles:
    """DeepSpeed's checkpoint engine here: the methods of its `CheckpointEngine` interface, which
    the engine calls by name (`engine.checkpoint_engine`), plus the background writer."""

    def __init__(self) -> None:
        self.name = "mlra_mega"
        self.asynchronous = False
        self.written: list[Path] = []
        self.kill_after_first_write = False  # the drill faults.kill_in_save_step
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staging: dict[str, Any] = {}  # file name -> its last async snapshot (buffers to reuse)
        self._in_flight: set[str] = set()  # names whose snapshot the writer still reads

    # -- DeepSpeed's interface -------------------------------------------------------------

    def create(self, info: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        path = Path(path)
        self.written.append(path)
        kill = self.kill_after_first_write
        if self.asynchronous:
            # A file's name (not its step directory) is the same at every save of this rank.
            name = path.name
            previous = None if name in self._in_flight else self._staging.get(name)
            data = self._staging[name] = snapshot(state_dict, previous)
            self._in_flight.add(name)

            def write() -> None:
                try:
                    self._write(data, path, kill)
                finally:
                    self._in_flight.discard(name)

            self.submit(write)
        else:
            self._write(state_dict, path, kill)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location)

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        # DeepSpeed clones views before a save; the async snapshot copies them anyway.
        return not self.asynchronous

    def set_commit_info(self, info: Any) -> None:
        pass

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        self.wait()

    # -- writing -----------------------------------------------------------------------------

    @staticmethod
    def _write(data: Any, path: Path, kill: bool = False) -> None:
        torch.save(data, path)
        if kill:  # the drill: die with this file written and the rest of the checkpoint not
            os.kill(os.getpid(), signal.SIGKILL)

    def submit(self, job: Callable[[], None]) -> None:
        """Runs `job` on this rank's writer thread, after the jobs before it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is not None and self._error is None:
                    job()
            except BaseException as exc:  # handed to the training thread at its next wait()
                self._error = exc
            finally:
                self._jobs.task_done()

    def pending(self) -> bool:
        return self._jobs.unfinished_tasks > 0

    def wait(self) -> None:
        """Until every submitted write is done; a write's error is raised here."""
        if self._thread is not None:
            self._jobs.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
