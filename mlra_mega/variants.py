"""The paper's variants as named presets, and the control it lacks.

    vanilla            Pre-LN GPT-2: standard attention, plain embedding
    scaled_embed       embedding output * sqrt(d) (Takase et al.)
    embed_ln           LayerNorm on the embedding output (as in BLOOM)
    mlra               Multi-head Low-Rank Attention on Q, K, V
    mha_matched_init   standard attention whose Q/K/V init std gives each projection MLRA's
                       output variance at init: d sigma_mha^2 = d r sigma^4, so
                       sigma_mha = sigma^2 sqrt(r) (r = the MLRA rank, d_head by default). It
                       separates what the factorization does from what a smaller init does.

`variant_overrides(name, model)` gives the dotted overrides of a variant for that model.
"""

from __future__ import annotations

import math

from mlra_mega.config import ConfigError, ModelConfig

__all__ = ["VARIANTS", "variant_overrides"]

VARIANTS = ("vanilla", "scaled_embed", "embed_ln", "mlra", "mha_matched_init")


def variant_overrides(name: str, model: ModelConfig) -> list[str]:
    if name not in VARIANTS:
        raise ConfigError("variant", f"unknown variant {name!r}", f"use one of {', '.join(VARIANTS)}")
    attention = "mlra" if name == "mlra" else "mha"
    embedding = {"scaled_embed": "scaled", "embed_ln": "layernorm"}.get(name, "vanilla")
    out = [f"model.attention={attention}", f"model.embedding={embedding}", "model.qkv_init_std=null"]
    if name == "mha_matched_init":
        out[-1] = f"model.qkv_init_std={model.init_std ** 2 * math.sqrt(model.mlra_rank)!r}"
    return out
