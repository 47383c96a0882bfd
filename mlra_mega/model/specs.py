"""ModuleSpecs: which attention (and core-attention backend), norm and MLP each variant's layers use.

Everything but the self-attention, the norms and (for llama) the MLP's first projection is
megatron-core's local GPT layer (Pre-LN, MLP, bias-dropout-add). `mha` is megatron's
SelfAttention (grouped-query with llama's `num_kv_heads`); `mlra` is `MLRASelfAttention`; the
norms are `norm.LayerNorm` (gpt2) or `norm.RMSNorm` (llama), which also serve sequence
parallelism; llama's SwiGLU MLP takes its [gate; up] projection from `swiglu`.
"""

from __future__ import annotations

import torch

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from mlra_mega.config import ModelConfig
from mlra_mega.errors import ConfigError
from mlra_mega.model.mlra import MLRAOutputProjection, MLRASelfAttention
from mlra_mega.model.norm import norm_class
from mlra_mega.model.sdpa import SDPAttention
from mlra_mega.model.swiglu import GatedColumnParallelLinear

__all__ = ["layer_spec", "block_spec", "core_attention_class", "QKVColumnParallelLinear"]


class QKVColumnParallelLinear(ColumnParallelLinear):
    """The fused QKV projection drawn at `model.qkv_init_std` instead of the layer default."""

    def __init__(self, *args, init_std: float, init_method=None, **kwargs) -> None:
        super().__init__(*args, init_method=lambda t: torch.nn.init.normal_(t, 0.0, init_std), **kwargs)


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def core_attention_class(cfg: ModelConfig) -> type:
    backend = cfg.attention_backend
    if backend == "auto":
        backend = ("te" if _have_te() else "sdpa") if torch.cuda.is_available() else "local"
    if backend == "local":
        return DotProductAttention
    if backend == "sdpa":
        return SDPAttention
    if not _have_te():
        raise ConfigError("model.attention_backend", "'te' needs Transformer Engine, which is not installed",
                          "install transformer-engine on a CUDA machine, or use auto, local or sdpa")
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return TEDotProductAttention


def _attention_spec(cfg: ModelConfig) -> ModuleSpec:
    core = core_attention_class(cfg)
    qkv_std = cfg.qkv_init_std or cfg.init_std
    if cfg.attention == "mha":
        qkv = (ColumnParallelLinear if cfg.qkv_init_std is None
               else ModuleSpec(module=QKVColumnParallelLinear, params={"init_std": qkv_std}))
        return ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                          submodules=SelfAttentionSubmodules(linear_qkv=qkv, core_attention=core,
                                                             linear_proj=RowParallelLinear))
    proj = RowParallelLinear
    if "o" in cfg.mlra.factorize:
        proj = ModuleSpec(module=MLRAOutputProjection, params={"rank": cfg.mlra_rank, "init_std": cfg.init_std})
    return ModuleSpec(
        module=MLRASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, "rank": cfg.mlra_rank,
                "factorize": tuple(cfg.mlra.factorize), "qkv_init_std": qkv_std},
        submodules=SelfAttentionSubmodules(linear_qkv=None, core_attention=core, linear_proj=proj),
    )


def layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """megatron's local GPT layer with this variant's self-attention, our norms and (llama) the
    SwiGLU MLP."""
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention = _attention_spec(cfg)
    spec.submodules.input_layernorm = norm_class(cfg.arch)
    spec.submodules.pre_mlp_layernorm = norm_class(cfg.arch)
    if cfg.arch == "llama":
        spec.submodules.mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=GatedColumnParallelLinear, linear_fc2=RowParallelLinear))
    return spec


def block_spec(cfg: ModelConfig, num_layers: int | None = None) -> TransformerBlockSubmodules:
    """The decoder (or one pipeline stage's part of it): `num_layers` (default all) of
    `layer_spec`, and the block type's norm as the final norm. TransformerBlock builds every spec it is
    given, so a stage lists only its own layers."""
    n = cfg.num_layers if num_layers is None else num_layers
    return TransformerBlockSubmodules(layer_specs=[layer_spec(cfg)] * n, layer_norm=norm_class(cfg.arch))
