"""The communication ledger counts every call the way it says: per group, the calls, the bytes of
each kind of collective (whole buffers), point-to-point both ways, asynchronous calls included,
through torch's functions and through DeepSpeed's comm module (which caches them); uninstalled, it
leaves torch as it was."""

from __future__ import annotations

import pytest

from tests.dist import dist_case, dist_result



@dist_case(2)
def known_calls() -> dict:
    import torch
    import torch.distributed as dist
    from torch._C._distributed_c10d import ProcessGroup

    from mlra_mega.comm.ledger import Ledger

    pair = dist.new_group([0, 1])
    solos = [dist.new_group([r]) for r in range(2)]
    before = ProcessGroup.__dict__["allreduce"]
    with Ledger({"pair": pair}) as ledger:
        x = torch.ones(10)                                   # 40 bytes
        dist.all_reduce(x, group=pair)
        dist.all_reduce(x)                                   # the default group: "world"
        out = torch.empty(20)
        dist.all_gather_into_tensor(out, x, group=pair)      # 80 bytes gathered
        parts = [torch.empty(10), torch.empty(10)]
        dist.all_gather(parts, x, group=pair)                # 80 bytes gathered
        small = torch.empty(5)
        dist.reduce_scatter_tensor(small, x, group=pair)     # 40 bytes scattered
        dist.broadcast(x, src=0, group=pair)                 # 40 bytes
        work = dist.all_reduce(torch.ones(3, dtype=torch.float64), group=pair, async_op=True)  # 24 bytes
        work.wait()
        if dist.get_rank() == 0:                             # 7 int64s each way
            dist.send(torch.arange(7), dst=1, group=pair)
            dist.recv(torch.empty(7, dtype=torch.int64), src=1, group=pair)
        else:
            y = torch.empty(7, dtype=torch.int64)
            dist.recv(y, src=0, group=pair)
            dist.send(y, dst=0, group=pair)
        import deepspeed.comm as ds_comm                     # DeepSpeed's own path
        from mlra_mega import cpu  # noqa: F401  (its CPU set-up)
        ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        ds_comm.all_gather_into_tensor(out, x, group=pair)   # 80 more bytes gathered
        dist.all_reduce(torch.ones(4), group=solos[dist.get_rank()])  # a group of one: nothing moves
        first = ledger.take()
        dist.barrier(group=pair)
        second = ledger.take()
    patched_back = ProcessGroup.__dict__["allreduce"] is before
    hosts = [None, None]
    dist.all_gather_object(hosts, dist.get_rank())  # torch works as before once it is uninstalled
    patched_back = patched_back and hosts == [0, 1]
    z = torch.ones(2)
    dist.all_reduce(z, group=pair)
    patched_back = patched_back and z.tolist() == [2.0, 2.0]
    return {"first": {f"{g}/{m}": (s.calls, s.bytes, s.time_s > 0) for (g, m), s in first.items()},
            "second": {f"{g}/{m}": (s.calls, s.bytes) for (g, m), s in second.items()},
            "groups": {g: (s.calls, s.bytes) for g, s in Ledger.by_group(first, ["pair", "world", "tp"]).items()},
            "patched_back": patched_back}


def test_a_ledger_left_installed_by_a_failed_run_is_replaced_and_torch_restored() -> None:
    from torch._C._distributed_c10d import ProcessGroup, Work

    from mlra_mega.comm.ledger import Ledger

    before, wait = ProcessGroup.__dict__["allreduce"], Work.__dict__.get("wait")
    stale = Ledger()
    stale.install()  # a run that raised before on_fit_end
    fresh = Ledger()
    fresh.install()
    assert Ledger._active is fresh and ProcessGroup.__dict__["allreduce"] is not before
    fresh.uninstall()
    assert Ledger._active is None
    assert ProcessGroup.__dict__["allreduce"] is before and Work.__dict__.get("wait") is wait
    stale.uninstall()  # a no-op now
    assert ProcessGroup.__dict__["allreduce"] is before


@pytest.mark.slow  # a two-process launch
def test_the_ledger_counts_every_call_with_its_bytes() -> None:
    for rank, got in enumerate(dist_result(__name__, 2, "known_calls")):
        # What each rank sends over 2 ranks: an all-reduce 2 (n-1)/n = 1x its buffer, an all-gather,
        # a reduce-scatter and a broadcast (n-1)/n = half theirs, a send all of it, a recv nothing.
        first = got["first"]
        assert first["pair/allreduce"] == (2, 40 + 24, True)
        assert first["world/allreduce"] == (1, 40, True)
        gathered = first.get("pair/all_gather_single", (0, 0, True))
        assert gathered[:2] == (2, 80), first  # torch's and DeepSpeed's all_gather_into_tensor, 80 bytes each
        assert first["pair/allgather"][:2] == (1, 40)
        assert first["pair/reduce_scatter_single"][:2] == (1, 20)
        assert first["pair/broadcast"][:2] == (1, 20)
        assert first["pair/send"][:2] == (1, 56) and first["pair/recv"][:2] == (1, 0)
        assert got["second"] == {"pair/barrier": (1, 0)}
        assert not any(k.startswith("other/") for k in first), first
        groups = got["groups"]
        assert groups["tp"] == (0, 0)  # named, never used
        assert groups["pair"] == (9, 64 + 80 + 40 + 20 + 20 + 56)
        assert got["patched_back"]
