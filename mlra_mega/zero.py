"""ZeRO-3 partitioned parameters made whole for a moment: the one way this package reads them.

Under ZeRO stage 3 each data-parallel rank holds a slice of every parameter (DeepSpeed marks such
a parameter with `ds_id`); reading its values needs DeepSpeed's gather, a collective over the
data-parallel group that every rank must enter. At stages 0-2 parameters are whole already and
`gathered` does nothing, so callers need not know the stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["gathered", "is_partitioned"]


def is_partitioned(params: Iterable[torch.nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


@contextmanager
def gathered(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block every one of `params` is whole on every rank (read-only: changes are lost)."""
    params = list(params)
    if not is_partitioned(params):
        yield
        return
    import deepspeed  # only a ZeRO-3 run gets here, and it has DeepSpeed loaded

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
