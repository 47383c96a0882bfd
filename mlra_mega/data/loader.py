"""Batches read ahead by DataLoader workers, in exactly the order `TrainBatches` serves them.

The global batch that starts at `consumed` samples is a pure function of `consumed`
(`TrainBatches.batch_at`), so the loader is a map-style dataset over "the i-th global batch from
where this loader started" with an unbounded sequential sampler: `data.num_workers` worker
processes build batches ahead of the step (`data.prefetch_factor` each) and, on a GPU, into pinned
memory (so the host-to-device copy can run asynchronously). Workers only read; the position is
counted here, by the batches the step has taken, never by what the workers have read ahead.
A jump in position (a resume, a rollback) closes the workers, and the next batch starts new
ones at the new position: a resumed run is served exactly what an uninterrupted one was.

Workers ignore the preemption signals (Slurm signals every process of a step): the trainer
decides when to stop, and the workers end with it. They also die the moment their rank dies: a
forked worker holds copies of its rank's sockets (gloo's connections, the rendezvous store's), so
a worker that outlived a killed rank by PyTorch's 5-second parent check would keep the peers from
seeing the connection close, and the run from naming the lost rank before Slurm's KillWait ends it.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import signal
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mlra_mega.data.datasets import TrainBatches

__all__ = ["PrefetchedBatches"]


class _GlobalBatchesFrom(Dataset):
    """Index i -> this rank's micro-batches of the global batch starting at `start + i * G`, as
    tensors where the loader pins them, else as numpy arrays: a batch's few kilobytes cross the
    worker queue faster pickled (1 ms here) than as tensors in shared memory (3 ms: a segment
    and a file descriptor per tensor)."""

    def __init__(self, batches: TrainBatches, start: int, as_tensors: bool) -> None:
        self.batches, self.start, self.as_tensors = batches, start, as_tensors

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        micro = self.batches.batch_at(self.start + i * self.batches.global_batch_size)
        return micro if self.as_tensors else [{k: v.numpy() for k, v in m.items()} for m in micro]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker_init(rank_pid: int, _: int) -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: PyTorch's own parent check ends the worker
        return
    if os.getppid() != rank_pid:  # the rank died before the request took effect
        os._exit(0)


def _as_is(batch: Any) -> Any:
    return batch


class PrefetchedBatches:
    """`TrainBatches`' interface (next_global_batch, consumed_samples, state), read ahead by workers.

    With `num_workers` 0 batches are read in the step, as `TrainBatches` does."""

    def __init__(self, batches: TrainBatches, *, num_workers: int, prefetch_factor: int = 2,
                 pin_memory: bool = False) -> None:
        self.batches = batches
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self._it: Any = None

    @property
    def consumed_samples(self) -> int:
        return self.batches.consumed_samples

    @property
    def global_batch_size(self) -> int:
        return self.batches.global_batch_size

    @property
    def accumulation_steps(self) -> int:
        return self.batches.accumulation_steps

    def _start(self) -> Any:
        loader = DataLoader(_GlobalBatchesFrom(self.batches, self.batches.consumed_samples, self.pin_memory),
                            batch_size=None,
                            sampler=itertools.count(), num_workers=self.num_workers, collate_fn=_as_is,
                            prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                            worker_init_fn=functools.partial(_worker_init, os.getpid()),
                            # Its own generator: starting workers draws their base seed, which from
                            # torch's global one would shift dropout after a resume.
                            generator=torch.Generator().manual_seed(0))
        return iter(loader)

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        if self.num_workers == 0:
            return self.batches.next_global_batch()
        if self._it is None:
            self._it = self._start()
        micro = next(self._it)
        self.batches.consumed_samples += self.batches.global_batch_size
        if not self.pin_memory:
            micro = [{k: torch.from_numpy(v) for k, v in m.items()} for m in micro]
        return micro

    def state_dict(self) -> dict[str, int]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["consumed_samples"]) != self.consumed_samples:
            self.close()  # what the workers read ahead belongs to the old position
        self.batches.load_state_dict(state)

    def close(self) -> None:
        """Ends the workers (the next batch starts new ones at the current position)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
