"""Throughput arithmetic: tokens/s, TFLOP/s per device, MFU only with a known peak."""

from __future__ import annotations

import pytest

from mlra_mega.metrics.throughput import throughput


def test_tokens_tflops_and_mfu() -> None:
    t = throughput(tokens=8192, seconds=0.5, flops_per_token=6 * 10**9, world_size=4, peak_tflops=10.0)
    assert t.tokens_per_s == 16384
    assert t.tflops_per_device == pytest.approx(6e9 * 16384 / 4 / 1e12)
    assert t.mfu == pytest.approx(t.tflops_per_device / 10.0)
    assert throughput(8192, 0.5, 6 * 10**9, 4).mfu is None
