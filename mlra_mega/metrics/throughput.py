"""Tokens per second, achieved TFLOP/s per device, and MFU, from the model's FLOPs formula."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Throughput", "throughput"]


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    tflops_per_device: float
    mfu: float | None  # None unless the peak is known


def throughput(tokens: int, seconds: float, flops_per_token: int, world_size: int,
               peak_tflops: float | None = None) -> Throughput:
    """`tokens` processed by the whole job in `seconds`; FLOPs per token for training."""
    tps = tokens / max(seconds, 1e-12)
    tflops = flops_per_token * tps / world_size / 1e12
    return Throughput(tps, tflops, tflops / peak_tflops if peak_tflops else None)
