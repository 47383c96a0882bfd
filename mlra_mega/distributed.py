"""Process group and megatron parallel state: set up in one place, torn down in one place.

Rank and world come from the launcher's environment (torchrun and the deepspeed launcher set
RANK / WORLD_SIZE / LOCAL_RANK, srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID); a plain
`python` process is a world of one. The backend is nccl where CUDA is available and gloo
elsewhere, where `cpu.apply()` adapts megatron-core first; `parallel.backend=gloo` keeps gloo
with GPUs (tensors stay on the GPU; several ranks may share one). Data-parallel size =
world / (TP x PP), in megatron-core's rank order (TP fastest, then DP, then PP).
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mlra_mega import cpu
from mlra_mega.config import ParallelConfig
from mlra_mega.errors import ConfigError

__all__ = ["ParallelContext", "DeepSpeedMPU", "LaunchEnv", "launch_env", "check_world", "from_stage", "setup", "teardown", "seed_everything", "reseed", "silent_ranks", "with_hosts"]


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "slurm" | "single"


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the TP x PP x DP layout, and the process groups of that layout.

    Made once by `setup`; every component that needs a group or a rank takes it from here (the
    rest of the package never asks megatron's `parallel_state`, which only the model build reads).
    """

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    backend: str
    tp_group: Any = None  # torch.distributed.ProcessGroup of this rank's tensor-parallel peers
    dp_group: Any = None  # ... and of its data-parallel peers (ZeRO shards over this one)
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Any = None  # ... of the stages of its pipeline (same TP and DP rank)
    pp_ranks: tuple[int, ...] = ()  # global ranks of that pipeline, first stage first
    mp_group: Any = None  # ... of its model-parallel peers (TP x PP): one copy of the model
    embedding_group: Any = None  # first and last stage of its pipeline (the tied embedding's two copies)
    in_embedding_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


class DeepSpeedMPU:
    """The layout in the shape DeepSpeed's `mpu` argument expects, so ZeRO shards over the
    data-parallel group only and gradient norms cover the whole model (TP x PP).

    The model-parallel group is TP x PP: ZeRO's norm all-reduces over it, so every stage clips by
    the global norm; its rank names DeepSpeed's per-stage model file (`mp_rank_XX`). A parameter
    that is not TP-sharded is counted where the *tensor*-parallel rank is 0, on every stage."""

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp_size * self.ctx.pp_size

    def get_model_parallel_rank(self) -> int:
        return self.ctx.pp_rank * self.ctx.tp_size + self.ctx.tp_rank

    def get_model_parallel_group(self):
        return self.ctx.mp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ctx.tp_size

    def get_tensor_model_parallel_group(self):
        return self.ctx.tp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ctx.pp_size

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ctx.pp_rank

    def get_pipeline_model_parallel_group(self):
        return self.ctx.pp_group

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_group(self):
        return self.ctx.dp_group


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Reads rank / world / local rank from torchrun-style or Slurm variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), "slurm")
    return LaunchEnv(0, 1, 0, "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(env: LaunchEnv, backend: str, timeout_s: float) -> None:
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.launcher == "single":
        # A world of one needs a store too; a private port keeps parallel runs apart.
        init = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend, init_method=init, rank=0, world_size=1, timeout=timeout)
        return
    if env.launcher == "slurm":
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ConfigError("launcher", "srun started this process but MASTER_ADDR / MASTER_PORT are unset",
                              "export them in the batch script (the slurm/ templates do)")
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)


def check_world(tp: int, pp: int, world_size: int) -> int:
    """The data-parallel size of TP x PP in this world, or a ConfigError naming the fix."""
    if pp == 1 and world_size % tp:
        raise ConfigError("parallel.tensor", f"{tp} does not divide the world size {world_size}",
                          "launch a multiple of parallel.tensor processes, or change parallel.tensor")
    if world_size % (tp * pp):
        raise ConfigError("parallel.pipeline", f"tensor x pipeline = {tp} x {pp} does not divide the world size "
                          f"{world_size}", f"launch a multiple of {tp * pp} processes, or change parallel.tensor / "
                          "parallel.pipeline")
    return world_size // (tp * pp)


def from_stage(values: list[float], ctx: ParallelContext, *, last: bool) -> list[float]:
    """`values` as the first (or last) pipeline stage has them, on every stage of the pipeline."""
    if ctx.pp_size == 1:
        return list(values)
    src = ctx.pp_ranks[-1 if last else 0]
    t = torch.tensor(values if ctx.rank == src else [0.0] * len(values), dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, src=src, group=ctx.pp_group)
    return t.tolist()


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and, where present, CUDA) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reseed(seed: int, step: int) -> int:
    """RNG states for a run resumed at `step` on another layout, where the saved per-rank states
    do not fit: derived from (seed, step) as a fresh start derives them from the seed (the same on
    every rank; megatron's tensor-parallel tracker adds the TP rank). Returns the derived seed."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    derived = (seed * 1_000_003 + step) % 2**31
    seed_everything(derived)
    model_parallel_cuda_manual_seed(derived)
    return derived


def setup(parallel: ParallelConfig, seed: int, *, timeout_s: float = 600.0) -> ParallelContext:
    """Initialises torch.distributed (unless already done), megatron parallel state and seeds."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu.apply()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("parallel.backend", "nccl needs CUDA GPUs and this process sees none",
                          "use parallel.backend=auto or gloo")

    env = launch_env()
    if dist.is_initialized():
        env = LaunchEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, env.launcher)
    check_world(parallel.tensor, parallel.pipeline, env.world_size)
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        _init_process_group(env, backend, timeout_s)
    # DeepSpeed insists on LOCAL_RANK in the environment, whatever started us (plain python, srun).
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor,
                                             pipeline_model_parallel_size=parallel.pipeline)

    if env.world_size > 1:
        # Every rank's host, once: when one dies, the others can say where it ran.
        hosts: list[Any] = [None] * env.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        _HOSTS[:] = hosts

    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    # The first and last stage hold the embedding group (megatron's default embedding ranks); its
    # own membership test can answer from an earlier layout's ranks on a middle stage.
    in_embedding_group = parallel.pipeline > 1 and (parallel_state.is_pipeline_first_stage()
                                                    or parallel_state.is_pipeline_last_stage())

    return ParallelContext(
        rank=env.rank,
        world_size=env.world_size,
        local_rank=env.local_rank,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
        backend=backend,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        pp_ranks=tuple(dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())),
        mp_group=parallel_state.get_model_parallel_group(),
        embedding_group=parallel_state.get_embedding_group() if in_embedding_group else None,
        in_embedding_group=in_embedding_group,
    )


def teardown(keep_process_group: bool = False) -> None:
    """Destroys megatron parallel state, the process groups it made, and (unless kept) the default
    process group."""
    from megatron.core import parallel_state

    # megatron's destroy_model_parallel only forgets its groups: each gloo group lives on with its
    # polling threads, so a process that sets up again and again (the tests, a sweep in one
    # process) gets slower with every set-up. Its list holds every group this rank is in.
    made = [g for g in (getattr(parallel_state, "_global_process_group_list", None) or []) if g is not None]
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        for group in made:
            try:
                dist.destroy_process_group(group)
            except (ValueError, RuntimeError):
                pass  # already destroyed (a DeepSpeed engine's release takes its own)
    if not keep_process_group and dist.is_initialized():
        dist.destroy_process_group()


_HOSTS: list[str] = []  # rank -> host, gathered at setup


def with_hosts(ranks: list[int]) -> str:
    """`3 (node2), 5 (node3)`: ranks with the host each ran on, where setup saw them."""
    return ", ".join(f"{r} ({_HOSTS[r]})" if r < len(_HOSTS) else str(r) for r in ranks)


def silent_ranks(wait_s: float = 5.0) -> list[int] | None:
    """After a failed collective: the ranks that do not answer a roll call, or None if unknown.

    Every rank that gets here writes its key into the launcher's rendezvous store (torchrun's
    agent hosts it; under srun and the deepspeed launcher rank 0 does) and waits up to `wait_s`
    for the others' keys. Those missing died or hang. A store that cannot be reached means its
    host is gone: rank 0 outside torchrun.
    """
    if not dist.is_initialized() or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    prefix = f"mlra/roll-call/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=wait_s), wait_for_workers=False)
        store.set(f"{prefix}{rank}", "here")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [r for r in range(world) if not store.check([f"{prefix}{r}"])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.1)
    except (RuntimeError, OSError, ValueError):  # the store's host is gone
        return [0] if rank != 0 else None
