"""Shared pieces of the model tests: tiny configs, large random weights, fixed tokens."""

from __future__ import annotations

import zlib

import torch

from mlra_mega.config import MLRAConfig, ModelConfig

VOCAB = 200      # padded to 256: TP 2 and 4 both split it, and 56 rows are padding
SEQ = 16
BATCH = 2

# (attention, embedding, tied, factorize, rank, backend)
VARIANTS = [
    (att, emb, tied, ("q", "k", "v"), None, "local")
    for att in ("mha", "mlra") for emb in ("vanilla", "scaled", "layernorm") for tied in (True, False)
] + [
    ("mlra", "vanilla", False, ("q", "k", "v", "o"), 8, "local"),
    ("mlra", "vanilla", True, ("k",), 4, "local"),
    ("mha", "vanilla", True, ("q", "k", "v"), None, "sdpa"),
    ("mlra", "layernorm", False, ("q", "k", "v"), None, "sdpa"),
]


# Llama blocks, 8 heads: (attention, key/value heads, factorize, rank, backend, embedding). TP
# must divide the key/value heads, so each runs at the TP sizes that allow it (kv 8 and 4 at TP
# 1/2/4, 2 at TP 1/2, 1 at TP 1).
LLAMA_VARIANTS = [
    (att, kv, ("q", "k", "v"), None, "local", "vanilla") for att in ("mha", "mlra") for kv in (8, 4, 2, 1)
] + [
    ("mlra", 2, ("q", "k", "v", "o"), 4, "sdpa", "vanilla"),
    ("mlra", 4, ("k", "v"), 4, "local", "scaled"),
    ("mha", 2, ("q", "k", "v"), None, "sdpa", "layernorm"),
    ("mlra", 8, ("q", "k", "v"), None, "local", "layernorm"),
]


def llama_id(v: tuple) -> str:
    att, kv, fac, rank, backend, emb = v
    return f"llama-{att}-kv{kv}-{''.join(fac)}-r{rank}-{backend}-{emb}"


def llama_cfg(v: tuple) -> ModelConfig:
    att, kv, fac, rank, backend, emb = v
    return tiny_cfg(att, emb, tied=None, factorize=fac, rank=rank, backend=backend, arch="llama", num_heads=8,
                    num_kv_heads=kv)


def variant_id(v: tuple) -> str:
    att, emb, tied, fac, rank, backend = v
    return f"{att}-{emb}-{'tied' if tied else 'untied'}-{''.join(fac)}-r{rank}-{backend}"


def tiny_cfg(attention: str = "mha", embedding: str = "vanilla", tied: bool | None = True,
             factorize: tuple[str, ...] = ("q", "k", "v"), rank: int | None = None, backend: str = "local",
             **overrides) -> ModelConfig:
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=VOCAB, seq_length=SEQ,
                      attention=attention, embedding=embedding, tie_embeddings=tied,
                      mlra=MLRAConfig(rank=rank, factorize=list(factorize)), attention_backend=backend)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


def large_weights(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-size N(0, std^2) tensors by parameter name (std >= 0.2: attention far from uniform).

    Each tensor's generator is seeded from its name, so the same full weights come out
    whatever order or subset of names asks for them.
    """
    out = {}
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
        out[name] = torch.randn(p.shape, generator=g) * std
    return out


def tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, position ids, labels) over the real vocabulary."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    return seq[:, :-1], positions, seq[:, 1:]
