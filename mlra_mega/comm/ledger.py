"""The communication ledger: the count, bytes and time of every collective and point-to-point
call, per process group, while it is installed.

It wraps the methods of torch's `ProcessGroup` (allreduce, allgather, reduce_scatter, broadcast,
send, recv, ...), the one layer every caller goes through: megatron-core's tensor-parallel
mappings, DeepSpeed's comm module (which caches torch's functions, so wrapping those would miss
it), the pipeline's p2p, our own all-reduces. `Work.wait` is wrapped too, so a call's time is
the time its caller spent issuing it plus waiting for it (for an asynchronous call waited later,
the time until that wait returned). Groups are named by the caller (`names`: tp, dp, pp, ...);
any other group is `other`, the default group `world`. Calls on a group of one process are not
counted: nothing moves.

Bytes are what this rank sends, as ring algorithms move them (the convention of `comm.expected`,
and of nccl-tests' bus bandwidth), for a buffer of B bytes over a group of n: an all-reduce
2 (n-1)/n B; an all-gather (B its gathered output), a reduce-scatter (B its full input), a
reduce, a broadcast, an all-to-all (n-1)/n B; a send B, a recv nothing (its sender counts it).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CallStats", "Ledger"]

# ProcessGroup method -> index of the argument that holds the payload (tensors or lists of them).
# The factor of each kind (times (n-1)/n, except point-to-point): see the module docstring.
ALL_REDUCE = {"allreduce", "allreduce_coalesced"}
POINT_TO_POINT = {"send"}
RECEIVE = {"recv", "recv_anysource"}
PAYLOAD_ARG = {
    "allreduce": 0, "allreduce_coalesced": 0, "broadcast": 0, "reduce": 0,
    "allgather": 0, "allgather_coalesced": 0, "allgather_into_tensor_coalesced": 0, "all_gather_single": 0,
    "_allgather_base": 0, "all_gather_single_coalesced": 0,
    "reduce_scatter": 1, "reduce_scatter_single": 1, "_reduce_scatter_base": 1, "reduce_scatter_tensor_coalesced": 1,
    "reduce_scatter_single_coalesced": 1,
    "alltoall": 1, "alltoall_base": 1, "all_to_all_single": 1, "gather": 1, "scatter": 0,
    "send": 0, "recv": 0, "recv_anysource": 0, "barrier": None,
}


@dataclass
class CallStats:
    calls: int = 0
    bytes: float = 0.0  # sent by this rank (module docstring)
    time_s: float = 0.0


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def _sent_bytes(method: str, n: int, buffer: int) -> float:
    """What one rank sends for a call on a buffer of `buffer` bytes over `n` ranks (ring algorithms)."""
    if method in POINT_TO_POINT:
        return float(buffer)
    if method in RECEIVE:
        return 0.0
    share = (n - 1) / n * buffer
    return 2 * share if method in ALL_REDUCE else share


class Ledger:
    """`with Ledger({"tp": tp_group, ...}) as ledger:` ... `ledger.take()` -> totals since the last take.

    One at a time per process (it patches a class): installing one uninstalls any other. Thread-safe enough for what it counts: calls
    from DeepSpeed's or our background threads are counted as they come, with the GIL's ordering.
    """

    _active: "Ledger | None" = None

    def __init__(self, names: dict[str, Any] | None = None) -> None:
        self._names: dict[int, str] = {}
        for name, group in (names or {}).items():
            if group is not None:
                self._names.setdefault(id(group), name)
        self._stats: dict[tuple[str, str], CallStats] = defaultdict(CallStats)
        self._pending: dict[int, tuple[str, str]] = {}  # id(work) -> (group, op), until it is waited
        self._saved: dict[str, Any] = {}

    # -- install / uninstall -------------------------------------------------------------------

    def __enter__(self) -> "Ledger":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def install(self) -> None:
        from torch._C._distributed_c10d import ProcessGroup, Work

        if Ledger._active is not None:
            # Left by a run that ended in an exception before its callbacks' on_fit_end: this
            # one replaces it (one ledger per process; wrapping twice would count twice).
            Ledger._active.uninstall()
        import torch.distributed as dist

        if dist.is_initialized():
            self._names.setdefault(id(dist.distributed_c10d._get_default_group()), "world")
        for method in PAYLOAD_ARG:
            bound = getattr(ProcessGroup, method, None)
            if bound is not None:
                # The class's own entry (None when inherited) is what uninstall puts back: the
                # object getattr returns does not bind `self` once set on the class again.
                self._saved[method] = (ProcessGroup, method, ProcessGroup.__dict__.get(method))
                setattr(ProcessGroup, method, self._wrap(method, bound))
        self._saved["Work.wait"] = (Work, "wait", Work.__dict__.get("wait"))
        Work.wait = self._wrap_wait(Work.wait)
        Ledger._active = self

    def uninstall(self) -> None:
        if Ledger._active is not self:
            return
        for cls, name, entry in self._saved.values():
            if entry is None:
                delattr(cls, name)
            else:
                setattr(cls, name, entry)
        self._saved.clear()
        Ledger._active = None

    def _wrap(self, method: str, original: Any):
        arg = PAYLOAD_ARG[method]
        ledger = self

        def call(pg, *args, **kwargs):
            start = time.perf_counter()
            work = original(pg, *args, **kwargs)
            if pg.size() == 1:  # nothing moves (DeepSpeed reduces over a data-parallel group of one)
                return work
            key = (ledger._names.get(id(pg), "other"), method)
            stats = ledger._stats[key]
            stats.calls += 1
            stats.bytes += _sent_bytes(method, pg.size(), _nbytes(args[arg]) if arg is not None and len(args) > arg else 0)
            stats.time_s += time.perf_counter() - start
            if work is not None:
                if len(ledger._pending) > 100_000:  # works nobody waits for (fire-and-forget sends)
                    ledger._pending.clear()
                ledger._pending[id(work)] = key
            return work

        return call

    def _wrap_wait(self, original: Any):
        ledger = self

        def wait(work, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(work, *args, **kwargs)
            finally:
                key = ledger._pending.pop(id(work), None)
                if key is not None:
                    ledger._stats[key].time_s += time.perf_counter() - start

        return wait

    # -- reading -------------------------------------------------------------------------------

    def take(self) -> dict[tuple[str, str], CallStats]:
        """{(group, method): stats} since the last `take` (or install), and a fresh start."""
        out, self._stats = dict(self._stats), defaultdict(CallStats)
        return out

    @staticmethod
    def by_group(stats: dict[tuple[str, str], CallStats], groups: Iterable[str] = ()) -> dict[str, CallStats]:
        """Totals per group (every group in `groups` present, zero if it made no call)."""
        out = {g: CallStats() for g in groups}
        for (group, _), s in stats.items():
            t = out.setdefault(group, CallStats())
            t.calls, t.bytes, t.time_s = t.calls + s.calls, t.bytes + s.bytes, t.time_s + s.time_s
        return out
