"""LayerNorm and RMSNorm for megatron-core layers that also work under sequence parallelism.

megatron-core's torch-based norm (`WrappedTorchNorm`) refuses sequence parallelism, since with
it each TP rank sees only its slice of the sequence, so the norm's weight and bias gradients are
partial sums that must be all-reduced over the TP group; the fused Apex / Transformer Engine
norms mark their parameters for that. These are torch's LayerNorm (gpt2 blocks) and RMSNorm
(llama blocks) with the same mark (`param.sequence_parallel`), which the trainer uses to do
that all-reduce.
"""

from __future__ import annotations

import torch

__all__ = ["LayerNorm", "RMSNorm", "norm_class"]


class LayerNorm(torch.nn.LayerNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)


class RMSNorm(torch.nn.RMSNorm):
    """x / sqrt(mean(x^2) + eps) * weight, no bias (Llama's norm)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)


def norm_class(arch: str) -> type[torch.nn.Module]:
    """The block type's norm: LayerNorm for gpt2, RMSNorm for llama."""
    return RMSNorm if arch == "llama" else LayerNorm
