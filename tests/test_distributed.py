"""Parallel set-up: launcher environments, TP x DP layouts, seeds, refusal of bad layouts."""

from __future__ import annotations

import pytest

from mlra_mega.config import ParallelConfig
from mlra_mega.distributed import LaunchEnv, launch_env
from mlra_mega.errors import ConfigError
from tests.dist import dist_case, dist_result


def test_launch_env_reads_torchrun_then_slurm() -> None:
    assert launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == LaunchEnv(3, 4, 1, "torchrun")
    assert launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == LaunchEnv(5, 8, 1, "slurm")
    # torchrun inside an sbatch allocation: torchrun's own variables describe this process.
    both = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert launch_env(both).world_size == 2
    assert launch_env({}) == LaunchEnv(0, 1, 0, "single")


def test_single_process_setup_and_teardown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mlra_mega import distributed

    ctx = distributed.setup(ParallelConfig(tensor=1), seed=3)
    try:
        assert (ctx.world_size, ctx.tp_size, ctx.dp_size, ctx.backend) == (1, 1, 1, "gloo")
        assert parallel_state.model_parallel_is_initialized()
    finally:
        distributed.teardown()
    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()


def test_backend_choice_and_nccl_without_a_gpu() -> None:
    import torch
    import torch.distributed as dist

    from mlra_mega import distributed

    ctx = distributed.setup(ParallelConfig(tensor=1, backend="gloo"), seed=3)
    try:
        assert ctx.backend == "gloo" and dist.get_backend() == "gloo"
    finally:
        distributed.teardown()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as err:
            distributed.setup(ParallelConfig(tensor=1, backend="nccl"), seed=3)
        assert err.value.field == "parallel.backend" and not dist.is_initialized()


@dist_case(2, 4)
def layouts() -> list[tuple[int, int, int, int]]:
    from mlra_mega import distributed

    seen = []
    for tp in (1, 2, 4):
        try:
            ctx = distributed.setup(ParallelConfig(tensor=tp), seed=1)
        except ConfigError as exc:
            seen.append(("error", exc.field))
            continue
        seen.append((ctx.tp_size, ctx.tp_rank, ctx.dp_size, ctx.dp_rank))
        distributed.teardown(keep_process_group=True)
    return seen


@pytest.mark.slow
def test_layouts_at_world_2_and_4() -> None:
    w2 = dist_result(__name__, 2, "layouts")
    assert w2 == [[(1, 0, 2, 0), (2, 0, 1, 0), ("error", "parallel.tensor")],
                  [(1, 0, 2, 1), (2, 1, 1, 0), ("error", "parallel.tensor")]]
    w4 = dist_result(__name__, 4, "layouts")
    # megatron puts TP ranks next to each other: ranks 0,1 form a TP group at TP=2.
    assert [r[1] for r in w4] == [(2, 0, 2, 0), (2, 1, 2, 0), (2, 0, 2, 1), (2, 1, 2, 1)]
    assert [r[2] for r in w4] == [(4, i, 1, 0) for i in range(4)]


@dist_case(2)
def tp_dropout_streams() -> tuple[list[float], list[float]]:
    """Tensor-parallel regions draw from per-TP-rank streams; the default stream is shared."""
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from mlra_mega import distributed

    distributed.setup(ParallelConfig(tensor=2), seed=9)
    try:
        with get_cuda_rng_tracker().fork():
            tp = torch.rand(3).tolist()
        default = torch.rand(3).tolist()
    finally:
        distributed.teardown(keep_process_group=True)
    return tp, default


@pytest.mark.slow
def test_tp_ranks_get_distinct_model_parallel_streams() -> None:
    (tp0, d0), (tp1, d1) = dist_result(__name__, 2, "tp_dropout_streams")
    assert tp0 != tp1
    assert d0 == d1
