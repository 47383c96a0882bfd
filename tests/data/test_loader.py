"""The read-ahead loader serves exactly `TrainBatches`' batches, and a jump in position (a resume,
a rollback) serves the new position's batches, not what the workers had read ahead."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
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


def _rank_with_workers(ds, port: int, out) -> None:
    """A rank: a connection to a peer (as gloo's), then loader workers forked with it, then idle."""
    conn = socket.create_connection(("127.0.0.1", port))
    loader = PrefetchedBatches(_plain(ds), num_workers=2)
    loader.next_global_batch()
    out.send([w.pid for w in loader._it._workers])
    time.sleep(120)
    conn.close()


def test_a_killed_rank_takes_its_workers_and_its_connections_with_it(dist1: None, tmp_path: Path,  # noqa: F811
                                                                     prefixes: list[str], tokenizer_dir: Path) -> None:
    """Forked workers hold copies of their rank's sockets: while one lives, a peer of a SIGKILLed
    rank sees no closed connection and cannot name the lost rank."""
    import psutil

    ds = build_datasets(data_cfg(prefixes, tmp_path), SEQ, load_tokenizer(tokenizer_dir), seed=3).train
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours, theirs = multiprocessing.Pipe()
        rank = multiprocessing.get_context("fork").Process(target=_rank_with_workers,
                                                           args=(ds, server.getsockname()[1], theirs))
        rank.start()
        peer, _ = server.accept()
        try:
            assert ours.poll(60), "the rank did not start its workers"
            workers = ours.recv()
            assert len(workers) == 2 and all(psutil.pid_exists(p) for p in workers)
            os.kill(rank.pid, signal.SIGKILL)
            peer.settimeout(2.0)
            assert peer.recv(1) == b"", "the peer must see the killed rank's connection close at once"
            deadline = time.monotonic() + 2.0
            while any(_alive(p) for p in workers) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not any(_alive(p) for p in workers), "the workers outlived their rank"
        finally:
            peer.close()
            rank.join(timeout=10)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
