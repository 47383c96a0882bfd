"""The SwiGLU MLP's first projection, [gate; up], laid out so that every TP size splits it the same way.

megatron-core's MLP with `gated_linear_unit` asks `linear_fc1` for 2f outputs and applies
silu(first half) * (second half) to each rank's output. Its own ColumnParallelLinear keeps each
rank's [gate_r; up_r] as one 2-D slice (stride 2), so the concatenation of the slices differs
with the TP size and a contiguous split of it is wrong. Here the weight is one 3-D parameter,
[2, f, d] = [gate; up] in full, split along dim 1: the full tensor is the same at every TP size,
and every converter that cuts parameters along their `partition_dim` (TP equivalence, export,
resharding) needs nothing special. The forward is megatron's own ColumnParallelLinear (sequence-
parallel gather, gradient all-reduce) on the [2 f/tp, d] view.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

__all__ = ["GatedColumnParallelLinear"]


class GatedColumnParallelLinear(ColumnParallelLinear):
    """linear_fc1 of a SwiGLU MLP: weight [2, f/tp, d] (gate, up), no bias."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False,
                 stride: int = 1, **kwargs) -> None:
        if bias:
            raise ValueError("GatedColumnParallelLinear has no bias (llama blocks have none)")
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=False,
                         skip_weight_param_allocation=True, **kwargs)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        width = output_size // 2
        local = width // tp
        # Drawn whole on the CPU from one generator and sliced, as megatron's CPU initialisation
        # does: every TP size starts from the same full model.
        full = torch.empty(output_size, input_size, dtype=torch.float32)
        if config.perform_initialization:
            init_method(full)
        full = full.view(2, width, input_size)[:, rank * local:(rank + 1) * local]
        self.weight = torch.nn.Parameter(full.to(dtype=config.params_dtype).contiguous())
        set_tensor_model_parallel_attributes(self.weight, True, 1, 1)
        setattr(self.weight, "allreduce", True)

    def forward(self, input_: Tensor, weight: Tensor | None = None, runtime_gather_output: bool | None = None):
        if runtime_gather_output:
            raise ValueError("a gated projection's output stays split over TP (the MLP's activation needs it so)")
        return super().forward(input_, weight=self.weight.flatten(0, 1), runtime_gather_output=False)
