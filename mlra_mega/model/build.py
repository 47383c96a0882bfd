"""A megatron-core GPTModel from a `ModelConfig`, with its parameter count and FLOPs per token.

GPT-2 choices are made here explicitly (Pre-LN, learned absolute positions, tanh GELU, biases,
LayerNorm eps 1e-5, dropout as configured rather than megatron's 0.1 default). Fused kernels
follow `model.fusions`: `auto` turns them on only where CUDA is available.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mlra_mega.config import ModelConfig
from mlra_mega.errors import ConfigError

__all__ = ["transformer_config", "build_model"]

_FUSION_FLAGS = (
    "bias_activation_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "bias_dropout_fusion",
    "gradient_accumulation_fusion",
    "apply_rope_fusion",
)


def _fusions_on(cfg: ModelConfig) -> bool:
    return cfg.fusions == "auto" and torch.cuda.is_available()


def transformer_config(cfg: ModelConfig, *, tensor_parallel: int = 1, sequence_parallel: bool = False,
                       params_dtype: torch.dtype = torch.float32):
    """megatron-core TransformerConfig for this model (fusions off on CPU)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fused = _fusions_on(cfg)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_size,
        kv_channels=cfg.head_dim,
        layernorm_epsilon=cfg.layernorm_eps,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        add_bias_linear=True,
        activation_func=functools.partial(F.gelu, approximate="tanh"),
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=tensor_parallel,
        sequence_parallel=sequence_parallel,
        # Full weights drawn on CPU from one generator, then split: the same model at every TP.
        use_cpu_initialization=True,
        params_dtype=params_dtype,
        **{flag: fused for flag in _FUSION_FLAGS if flag != "bias_activation_fusion"},
        # The fused bias-GELU kernel is erf GELU; GPT-2 is tanh, so it stays off.
        bias_activation_fusion=False,
    )


def build_model(cfg: ModelConfig, *, tensor_parallel: int = 1, sequence_parallel: bool = False,
                params_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A megatron-core GPTModel for this config, holding this TP rank's shards."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if cfg.attention != "mha":
        raise ConfigError("model.attention", f"{cfg.attention!r} is not built yet", "use model.attention=mha")
    if cfg.embedding != "vanilla":
        raise ConfigError("model.embedding", f"{cfg.embedding!r} is not built yet", "use model.embedding=vanilla")
    tcfg = transformer_config(cfg, tensor_parallel=tensor_parallel, sequence_parallel=sequence_parallel,
                              params_dtype=params_dtype)
    return GPTModel(
        config=tcfg,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_positions,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="learned_absolute",
    )
