"""The read-ahead loader serves exactly `TrainBatches`' batches, and a jump in position (a resume,
a rollback) serves the new position's batches, not what the workers had read ahead."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from mlra_mega.data.datasets import SampleOrder, TrainBatches, build_datasets
from mlra_mega.data.loader import PrefetchedBatches
from mlra_mega.data.tokenizer import load_tokenizer
from tests.data.test_datasets import SEQ, data_cfg, dist1, prefixes  # noqa: F401 (fixtures)


def _plain(ds, consumed: int = 0, dp_rank: int = 0, dp_size: int = 1) -> TrainBatches:
    return TrainBatches(ds, SampleOrder(len(ds), 3), global_batch_size=8, micro_batch_size=2,
                        dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed)


def _tokens(micro: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([m["tokens"] for m in micro])


def test_workers_serve_the_synchronous_batches_and_follow_a_jump(dist1: None, tmp_path: Path,  # noqa: F811
                                                                 prefixes: list[str], tokenizer_dir: Path) -> None:
    ds = build_datasets(data_cfg(prefixes, tmp_path), SEQ, load_tokenizer(tokenizer_dir), seed=3).train
    plain = _plain(ds, dp_rank=1, dp_size=2)
    expected = [plain.next_global_batch() for _ in range(12)]
    loader = PrefetchedBatches(_plain(ds, dp_rank=1, dp_size=2), num_workers=2, prefetch_factor=3)
    try:
        rng = torch.get_rng_state()
        got = [loader.next_global_batch() for _ in range(5)]
        # Starting workers draws no number from torch's RNG (dropout after a resume depends on it).
        assert torch.equal(torch.get_rng_state(), rng)
        assert loader.consumed_samples == 5 * 8  # counted by what the step took, not what was read ahead
        assert loader.state_dict() == {"consumed_samples": 40}
        # A rollback's jump back: the read-ahead batches 6.. are dropped, 3.. served again.
        loader.load_state_dict({"consumed_samples": 3 * 8})
        again = [loader.next_global_batch() for _ in range(9)]
        assert loader.consumed_samples == 12 * 8
    finally:
        loader.close()
    for a, b in zip(got + again, expected[:5] + expected[3:12], strict=True):
        assert len(a) == len(b) == 2
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    # A fresh loader at a resumed position is the uninterrupted one's continuation; with pinned
    # memory (tensors through shared memory; no pinning without an accelerator) the same.
    for pin in (False, True):
        resumed = PrefetchedBatches(_plain(ds, consumed=7 * 8, dp_rank=1, dp_size=2), num_workers=1, pin_memory=pin)
        try:
            assert all(torch.equal(_tokens(resumed.next_global_batch()), _tokens(expected[k])) for k in range(7, 12))
        finally:
            resumed.close()


def test_workers_ignore_the_preemption_signals(dist1: None, tmp_path: Path,  # noqa: F811
                                               prefixes: list[str], tokenizer_dir: Path) -> None:
    """Slurm signals every process of a step: a worker killed by SIGUSR1 would end the run before
    the trainer could checkpoint."""
    ds = build_datasets(data_cfg(prefixes, tmp_path), SEQ, load_tokenizer(tokenizer_dir), seed=3).train
    loader = PrefetchedBatches(_plain(ds), num_workers=1)
    try:
        first = loader.next_global_batch()
        (pid,) = [w.pid for w in loader._it._workers]
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(pid, sig)
        batches = [loader.next_global_batch() for _ in range(6)]
        assert loader._it._workers[0].is_alive()
    finally:
        loader.close()
    plain = _plain(ds)
    assert [torch.equal(_tokens(b), _tokens(plain.next_global_batch())) for b in [first, *batches]] == [True] * 7
