"""The paper's variants as named presets, and the control it lacks.

    vanilla            Pre-LN GPT-2: standard attention, plain embedding
    scaled_embed       embedding output * sqrt(d) (Takase et al.)
    embed_ln           LayerNorm on the embedding output (as in BLOOM)
    mlra               Multi-head Low-Rank Attention on Q, K, V
    mha_matched_init   standard attention whose Q/K/V init std gives each projection MLRA's
                       output variance at init: d sigma_mha^2 = d r sigma^4, so
                       sigma_mha = sigma^2 sqrt(r) (r = the MLRA rank, d_head by default). It
                       separates what the factorization does from what a smaller init does.

`variant_settings(name, model)` gives the settings of a variant for that model (and
`variant_overrides` the same as command-line overrides).
"""

from __future__ import annotations

import math
from typing import Any

from mlra_mega.config import ConfigError, ModelConfig

__all__ = ["VARIANTS", "variant_overrides", "variant_settings"]

VARIANTS = ("vanilla", "scaled_embed", "embed_ln", "mlra", "mha_matched_init")


def variant_settings(name: str, model: ModelConfig) -> dict[str, Any]:
    """{dotted key: value} that make `model` the variant `name`."""
    if name not in VARIANTS:
        raise ConfigError("variant", f"unknown variant {name!r}", f"use one of {', '.join(VARIANTS)}")
    out: dict[str, Any] = {"model.attention": "mlra" if name == "mlra" else "mha",
                           "model.embedding": {"scaled_embed": "scaled", "embed_ln": "layernorm"}.get(name, "vanilla"),
                           "model.qkv_init_std": None}
    if name == "mha_matched_init":
        out["model.qkv_init_std"] = model.init_std ** 2 * math.sqrt(model.mlra_rank)
    return out


def variant_overrides(name: str, model: ModelConfig) -> list[str]:
    """The same as `section.key=value` overrides (for command lines and scripts)."""
    return [f"{k}={'null' if v is None else (repr(v) if isinstance(v, float) else v)}"
            for k, v in variant_settings(name, model).items()]
