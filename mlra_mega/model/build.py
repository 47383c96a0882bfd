"""A megatron-core GPTModel from a `ModelConfig`, with its parameter count and FLOPs per token.

The block type's choices are made here explicitly. gpt2: Pre-LN, learned absolute positions,
tanh GELU, biases, LayerNorm. llama (`model.arch`): Pre-RMSNorm, rotary positions
(`rotary_base`), SwiGLU, no biases, grouped-query attention (`num_kv_heads`). Both: norm eps
from the config (1e-5), dropout as configured rather than megatron's 0.1 default, N(0,
init_std) weights with residual-branch output projections at init_std / sqrt(2L). Fused
kernels follow `model.fusions` (`fusion_flags`): `auto` turns on, where CUDA is available, those
the installed stack supports.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mlra_mega.config import ModelConfig, check_tensor_parallel
from mlra_mega.errors import ConfigError

__all__ = ["fusion_flags", "recompute_settings", "transformer_config", "build_model", "count_parameters", "forward_flops_per_token",
           "flops_per_token"]

def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def fusion_flags(cfg: ModelConfig) -> dict[str, bool]:
    """Which fused kernels to use: none on CPU or with fusions=off; else those the stack has."""
    on = cfg.fusions == "auto" and torch.cuda.is_available()
    return {
        # megatron's fused softmax calls a compiled extension; without it, it would fail at run time.
        "masked_softmax_fusion": on and _importable("scaled_masked_softmax_cuda"),
        "bias_dropout_fusion": on,  # torch.jit-scripted, needs nothing compiled
        # Fused weight-gradient accumulation writes param.main_grad, which only megatron's own DDP
        # allocates; DeepSpeed owns our gradients, so it stays off everywhere.
        "gradient_accumulation_fusion": False,
        # The fused bias-GELU kernel is erf GELU; GPT-2's is tanh.
        "bias_activation_fusion": False,
        "persist_layer_norm": False,  # Apex's FusedLayerNorm only; the local spec uses torch's
        # Off everywhere: megatron's fused RoPE needs Transformer Engine or Apex, and gpt2 has none.
        "apply_rope_fusion": False,
    }


def _normal(std: float):
    return lambda t: torch.nn.init.normal_(t, mean=0.0, std=std)


def recompute_settings(recompute: str = "none", method: str = "uniform", num_layers: int = 1) -> dict:
    """megatron-core's recompute fields for `train.recompute` / `_method` / `_num_layers`."""
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=num_layers)
    if recompute == "selective":  # the core attention (scores, softmax, values) of every layer
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return {}


def transformer_config(cfg: ModelConfig, *, tensor_parallel: int = 1, sequence_parallel: bool = False,
                       params_dtype: torch.dtype = torch.float32, bf16: bool = False,
                       recompute: dict | None = None, pipeline: int = 1, pipeline_layers: list[int] | None = None):
    """megatron-core TransformerConfig for this model (fusions off on CPU); `recompute` from
    `recompute_settings`; `pipeline` stages, `pipeline_layers` = [first, last] for an uneven split."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    residual_std = cfg.init_std / (2.0 * cfg.num_layers) ** 0.5 if cfg.scale_residual_init else cfg.init_std
    extra = dict(recompute or {})
    if pipeline > 1:
        extra.update(pipeline_model_parallel_size=pipeline, pipeline_dtype=torch.bfloat16 if bf16 else params_dtype,
                     # The synchronize after batched p2p is a CUDA-stream guard; gloo's waits are enough.
                     batch_p2p_sync=torch.cuda.is_available())
        if pipeline_layers is not None:
            extra.update(num_layers_in_first_pipeline_stage=pipeline_layers[0],
                         num_layers_in_last_pipeline_stage=pipeline_layers[1])
    if cfg.arch == "llama":
        block = dict(normalization="RMSNorm", add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
                     num_query_groups=cfg.kv_heads)
    else:
        block = dict(normalization="LayerNorm", add_bias_linear=True,
                     activation_func=functools.partial(F.gelu, approximate="tanh"))
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_size,
        kv_channels=cfg.head_dim,
        layernorm_epsilon=cfg.layernorm_eps,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        **block,
        init_method_std=cfg.init_std,
        init_method=_normal(cfg.init_std),
        output_layer_init_method=_normal(residual_std),
        tensor_model_parallel_size=tensor_parallel,
        sequence_parallel=sequence_parallel,
        # Full weights drawn on CPU from one generator, then split: the same model at every TP.
        use_cpu_initialization=True,
        params_dtype=params_dtype,
        bf16=bf16,
        **fusion_flags(cfg),
        **extra,
    )


def build_model(cfg: ModelConfig, *, tensor_parallel: int | None = None, sequence_parallel: bool = False,
                params_dtype: torch.dtype = torch.float32, bf16: bool = False,
                recompute: dict | None = None, pipeline_layers: list[int] | None = None) -> torch.nn.Module:
    """A megatron-core GPTModel for this config, holding this TP rank's shards of this pipeline
    stage (on the CPU); the stage count is the initialised parallel state's."""
    from megatron.core import parallel_state

    from mlra_mega.config import pipeline_split
    from mlra_mega.model.embedding import GPTModelWithEmbedding
    from mlra_mega.model.pipeline import replay_init_before_stage
    from mlra_mega.model.specs import block_spec

    cfg.validate()
    if tensor_parallel is None:
        tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
    check_tensor_parallel(cfg, tensor_parallel)
    if parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel:
        raise ConfigError("parallel.tensor",
                          f"{tensor_parallel} differs from the initialised tensor-parallel size "
                          f"{parallel_state.get_tensor_model_parallel_world_size()}",
                          "build the model after distributed.setup with the same parallel.tensor")
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    split = pipeline_split(cfg.num_layers, pp, pipeline_layers)
    tcfg = transformer_config(cfg, tensor_parallel=tensor_parallel, sequence_parallel=sequence_parallel,
                              params_dtype=params_dtype, bf16=bf16, recompute=recompute, pipeline=pp,
                              pipeline_layers=pipeline_layers)
    replay_init_before_stage(cfg, tcfg, sum(split[:stage]), first_stage=stage == 0)
    return GPTModelWithEmbedding(
        config=tcfg,
        transformer_layer_spec=block_spec(cfg, split[stage]),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_positions,
        pre_process=stage == 0,
        post_process=stage == pp - 1,
        share_embeddings_and_output_weights=cfg.tied_embeddings,
        position_embedding_type="learned_absolute" if cfg.learned_positions else "rope",
        rotary_base=cfg.rotary_base,
        embedding=cfg.embedding,
    )


def _attention_weights(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, multiply-accumulates per token) of one layer's attention projections."""
    d, dh, r = cfg.hidden_size, cfg.head_dim, cfg.mlra_rank
    bias = cfg.arch == "gpt2"
    params = macs = 0
    for p in ("q", "k", "v"):
        heads = cfg.num_heads if p == "q" else cfg.kv_heads
        if cfg.attention == "mlra" and p in cfg.mlra.factorize:
            macs += d * heads * r + heads * r * dh      # A (d x heads r), then per-head B (r x dh)
            params += d * heads * r + heads * r * dh + bias * heads * dh
        else:
            macs += d * heads * dh
            params += d * heads * dh + bias * heads * dh
    h = cfg.num_heads
    if cfg.attention == "mlra" and "o" in cfg.mlra.factorize:
        macs += h * dh * r + h * r * d                  # per-head A^O (dh x r), then B^O (hr x d)
        params += h * dh * r + h * r * d + bias * d
    else:
        macs += d * d
        params += d * d + bias * d
    return params, macs


def _mlp_weights(cfg: ModelConfig) -> int:
    """Multiply-accumulates per token (= weights) of one layer's MLP: GELU's two matrices, or
    SwiGLU's three (gate, up, down)."""
    return (3 if cfg.arch == "llama" else 2) * cfg.hidden_size * cfg.ffn_size


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the built model, padded vocabulary rows included, a tied matrix once."""
    d, f, L = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
    attn, _ = _attention_weights(cfg)
    if cfg.arch == "llama":  # RMSNorm weights only, no biases, no position table
        norm, mlp_bias, positions = d, 0, 0
    else:
        norm, mlp_bias, positions = 2 * d, f + d, cfg.max_positions * d
    per_layer = norm + attn + norm + _mlp_weights(cfg) + mlp_bias
    total = cfg.padded_vocab_size * d + positions + L * per_layer + norm
    if cfg.embedding == "layernorm":
        total += 2 * d
    if not cfg.tied_embeddings:
        total += cfg.padded_vocab_size * d
    return total


def forward_flops_per_token(cfg: ModelConfig, seq_length: int | None = None) -> int:
    """Matmul FLOPs (2 per multiply-accumulate) of one forward pass, per token.

    Counts every linear layer, the logits over the padded vocabulary, and attention scores and
    values over the full s x s square, as megatron's kernels compute them (causal masking is
    applied after the product, so no halving). Norms, activations, rotary and softmax are left out.
    """
    s = seq_length or cfg.seq_length
    d, L = cfg.hidden_size, cfg.num_layers
    _, attn_macs = _attention_weights(cfg)
    per_layer = attn_macs + 2 * s * d + _mlp_weights(cfg)   # projections, QK^T and AV, MLP
    return 2 * (L * per_layer + d * cfg.padded_vocab_size)


def flops_per_token(cfg: ModelConfig, seq_length: int | None = None) -> int:
    """Training FLOPs per token: forward plus a backward of twice its cost."""
    return 3 * forward_flops_per_token(cfg, seq_length)
