"""In-process model tests run inside a one-process TP = 1 megatron parallel state."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def tp1() -> Iterator[None]:
    from mlra_mega import distributed
    from mlra_mega.config import ParallelConfig

    distributed.setup(ParallelConfig(tensor=1), seed=1)
    yield
    distributed.teardown()
