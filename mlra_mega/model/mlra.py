"""Multi-head Low-Rank Attention: a megatron-core self-attention whose projections are A_h B_h.

The math, on one device: for every head h and every factorized projection X (a subset of
q, k, v), X_h = x A^X_h B^X_h + b^X_h with A^X_h: d x r and B^X_h: r x d_head. Unfactorized
projections are the usual x W^X_h + b^X_h. With `o` factorized, the output projection is
sum_h o_h A^O_h B^O_h + b^O with A^O_h: d_head x r and B^O_h: r x d.

Tensor parallelism is a thin layer on top, the one megatron attention already has: heads are
split over TP ranks and their factors live with them.
- the A factors of all local heads (and the unfactorized projections) are one
  `ColumnParallelLinear` each, their rows ordered head by head;
- the B factors are a per-head batched matmul (`HeadwiseLinear`) on local heads, no communication;
- the output projection is a `RowParallelLinear` (after a per-head A^O when `o` is factorized),
  whose all-reduce is the layer's only communication, as in standard attention.
Core attention, rotary handling and the rest of the layer are megatron-core's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.attention import Attention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType

__all__ = ["HeadwiseLinear", "MLRAOutputProjection", "MLRASelfAttention"]


def _normal(std: float):
    return lambda t: torch.nn.init.normal_(t, mean=0.0, std=std)


class HeadwiseLinear(torch.nn.Module):
    """y[..., h, :] = x[..., h, :] @ W[h] (+ b[h]) for the local heads: block-diagonal, no comm.

    The full weight (num_heads, in, out) is drawn on the CPU from one generator and the local
    heads are sliced out, so every TP size starts from the same full model (as megatron's
    linears do with use_cpu_initialization; the model is moved to its device afterwards).
    """

    def __init__(self, num_heads: int, in_features: int, out_features: int, *, bias: bool,
                 init_std: float, params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        local = num_heads // tp
        full = torch.empty(num_heads, in_features, out_features, dtype=torch.float32)
        _normal(init_std)(full)
        self.weight = torch.nn.Parameter(full[rank * local:(rank + 1) * local].to(dtype=params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(local, out_features, dtype=params_dtype))
            set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.einsum("...hi,hio->...ho", x, self.weight)
        return y if self.bias is None else y + self.bias


class MLRAOutputProjection(torch.nn.Module):
    """Factorized output projection: per-head A^O (local), then row-parallel B^O.

    Built where megatron builds `linear_proj`, with its arguments, and returns (output, bias)
    like `RowParallelLinear` with skip_bias_add, so the layer's bias-dropout-add is unchanged.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool,
                 input_is_parallel: bool, skip_bias_add: bool, is_expert: bool,
                 tp_comm_buffer_name: str | None = None, tp_group=None, rank: int, init_std: float) -> None:
        super().__init__()
        heads = config.num_attention_heads
        head_dim = input_size // heads
        self.head_dim = head_dim
        self.linear_a = HeadwiseLinear(heads, head_dim, rank, bias=False, init_std=init_std,
                                       params_dtype=config.params_dtype)
        self.linear_b = RowParallelLinear(heads * rank, output_size, config=config, init_method=init_method,
                                          bias=bias, input_is_parallel=input_is_parallel,
                                          skip_bias_add=skip_bias_add, is_expert=is_expert,
                                          tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        s, b, _ = x.shape
        low = self.linear_a(x.view(s, b, -1, self.head_dim))
        return self.linear_b(low.reshape(s, b, -1))

    def backward_dw(self) -> None:  # megatron calls this on linear_proj with delayed wgrad
        self.linear_b.backward_dw()


class MLRASelfAttention(Attention):
    """megatron-core self-attention with per-head low-rank Q/K/V (and optionally O) factors.

    With grouped-query attention (llama blocks, `num_query_groups` < heads) q is factored per
    query head and k, v per key/value head. The A factors and the unfactorized projections are
    laid out group by group (each group's q heads, then its k, then its v), megatron's own QKV
    order, so TP, which splits whole groups, cuts them contiguously; with one group per head this
    is the per-head [q, k, v] order. Rotary positions are applied by megatron to the q and k this
    returns, i.e. after the low-rank projections.
    """

    def __init__(self, config, submodules: SelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, cp_comm_type: str | None = None,
                 pg_collection=None, *, rank: int, factorize: tuple[str, ...], qkv_init_std: float) -> None:
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, attention_type="self", cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection)
        heads, groups = config.num_attention_heads, config.num_query_groups
        if heads % groups:
            raise ValueError(f"num_query_groups {groups} must divide num_attention_heads {heads}")
        head_dim = self.hidden_size_per_attention_head
        self.rank = rank
        self.factorized = tuple(p for p in ("q", "k", "v") if p in factorize)
        self.full = tuple(p for p in ("q", "k", "v") if p not in factorize)
        per_group = heads // groups
        # Heads of each projection in one query group: q has per_group, k and v one each.
        self.group_heads = {"q": per_group, "k": 1, "v": 1}
        init = _normal(qkv_init_std)

        self.linear_a = None
        if self.factorized:
            width = groups * sum(self.group_heads[p] for p in self.factorized) * rank
            self.linear_a = ColumnParallelLinear(
                config.hidden_size, width, config=config, init_method=init,
                bias=False, gather_output=False, skip_bias_add=False, is_expert=False, tp_group=self.tp_group)
        # One HeadwiseLinear per factorized projection: named linear_b_q, linear_b_k, linear_b_v.
        for p in self.factorized:
            self.add_module(f"linear_b_{p}", HeadwiseLinear(groups * self.group_heads[p], rank, head_dim,
                                                            bias=config.add_bias_linear, init_std=qkv_init_std,
                                                            params_dtype=config.params_dtype))
        self.linear_qkv = None
        if self.full:
            width = groups * sum(self.group_heads[p] for p in self.full) * head_dim
            self.linear_qkv = ColumnParallelLinear(
                config.hidden_size, width, config=config, init_method=init,
                bias=config.add_bias_linear, gather_output=False, skip_bias_add=False, is_expert=False,
                tp_group=self.tp_group)
        self.q_layernorm = None
        self.k_layernorm = None

    def _split_groups(self, mixed: Tensor, names: tuple[str, ...], size: int) -> dict[str, Tensor]:
        """[s, b, groups * (...)] in group order -> {projection: [s, b, its heads, size]}."""
        groups = self.num_query_groups_per_partition
        mixed = mixed.view(*mixed.shape[:2], groups, -1)
        parts = torch.split(mixed, [self.group_heads[p] * size for p in names], dim=-1)
        return {p: t.reshape(*t.shape[:2], groups * self.group_heads[p], size) for p, t in zip(names, parts)}

    def get_query_key_value_tensors(self, hidden_states: Tensor, key_value_states: Tensor | None = None,
                                    output_gate: bool = False, split_qkv: bool = True):
        if output_gate or not split_qkv:
            raise NotImplementedError("MLRA supports neither output gates nor fused QKV-RoPE")
        # Shapes from the projections' outputs: under sequence parallelism they gather the sequence.
        out: dict[str, Tensor] = {}
        if self.linear_a is not None:
            low, _ = self.linear_a(hidden_states)
            for p, t in self._split_groups(low, self.factorized, self.rank).items():
                out[p] = getattr(self, f"linear_b_{p}")(t)
        if self.linear_qkv is not None:
            mixed, _ = self.linear_qkv(hidden_states)
            out.update(self._split_groups(mixed, self.full, self.hidden_size_per_attention_head))
        return out["q"].contiguous(), out["k"].contiguous(), out["v"].contiguous()
