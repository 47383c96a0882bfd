"""Bytes this rank holds for the model: parameters (transformer layers apart from the rest),
gradients, optimizer state, and the activations a micro-batch saves for backward.

What `mlra-mega plan` predicts is checked against these (bench/plan_check.py, tests):
- parameters: every parameter tensor of this rank (ZeRO-3: its partition);
- optimizer state: every tensor the optimizer keeps (AdamW's moments, DeepSpeed's fp32 master
  partition where it keeps one), each storage once;
- activations: the bytes of the tensors autograd saves during one forward (each storage once),
  measured with `saved_tensors_hooks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["parameter_bytes", "optimizer_state_bytes", "SavedBytes"]

_MASTER_COPIES = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """{"layers": bytes of transformer-layer parameters, "other": the rest} on this rank."""
    out = {"layers": 0, "other": 0}
    for name, p in model.named_parameters():
        numel = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()  # ZeRO-3: the partition
        out["layers" if ".layers." in f".{name}" else "other"] += numel * p.element_size()
    return out


def optimizer_state_bytes(engine: Any) -> int:
    """Bytes of the optimizer's state on this rank (moments and master copies, each storage once)."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() > 1 and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += _nbytes(t)

    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    for state in inner.state.values():
        for t in state.values():
            add(t)
    for attr in _MASTER_COPIES:
        for t in getattr(wrapper, attr, None) or []:
            add(t)
    return total


class SavedBytes:
    """`with SavedBytes(model) as saved: loss = model(...)`: `saved.bytes` that autograd kept,
    the model's own parameters (which matmuls save too) left out. It looks at every parameter on
    each saved tensor: for measuring small models, not for training."""

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.bytes = 0
        self._seen: set[int] = set()
        self._model = model

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        # Parameters as they are now: ZeRO-3 gathers them into fresh storage for the forward.
        params = () if self._model is None else {p.untyped_storage().data_ptr() for p in self._model.parameters()}
        if ptr not in self._seen and ptr not in params:
            self._seen.add(ptr)
            self.bytes += t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def _hooks(self) -> Iterator["SavedBytes"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    def __enter__(self) -> "SavedBytes":
        self._cm = self._hooks()
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)
