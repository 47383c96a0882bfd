"""The paper's embedding baselines on megatron-core: Scaled Embed and Embed LN.

GPTModel hard-codes `LanguageModelEmbedding`, so `GPTModelWithEmbedding` builds the plain one
and then swaps in a subclass that adopts its parameters (the same Parameter objects, so ties
and tensor-parallel attributes are kept, and vanilla / scaled / layernorm models built from one
seed start from identical weights):
- Scaled Embed (Takase et al., "Spike No More"): the embedding output times sqrt(d);
- Embed LN (as in BLOOM): a LayerNorm on the embedding output.
Both act on the embedding output (token + position, after embedding dropout), in the same
[s, b, h] layout, sequence-parallel shard included.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel

from mlra_mega.model.norm import LayerNorm

__all__ = ["ScaledEmbedding", "LayerNormEmbedding", "GPTModelWithEmbedding", "EMBEDDINGS"]


class _AdoptingEmbedding(LanguageModelEmbedding):
    """A LanguageModelEmbedding built around another one's parameters."""

    @classmethod
    def adopt(cls, plain: LanguageModelEmbedding, **extra) -> "_AdoptingEmbedding":
        # Built with initialisation off and the RNG untouched: every weight comes from `plain`.
        from dataclasses import replace

        quiet = replace(plain.config, perform_initialization=False)
        with torch.random.fork_rng(devices=[]):
            new = cls(config=quiet, vocab_size=plain.vocab_size, max_sequence_length=plain.max_sequence_length,
                      position_embedding_type="learned_absolute" if plain.add_position_embedding else "none",
                      num_tokentypes=plain.num_tokentypes,
                      scatter_to_sequence_parallel=plain.scatter_to_sequence_parallel, tp_group=plain.tp_group,
                      **extra)
        new.config = plain.config
        new.word_embeddings = plain.word_embeddings
        if plain.add_position_embedding:
            new.position_embeddings = plain.position_embeddings
        new.tokentype_embeddings = plain.tokentype_embeddings
        return new


class ScaledEmbedding(_AdoptingEmbedding):
    """Embedding output multiplied by sqrt(hidden_size)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = math.sqrt(self.config.hidden_size)

    def forward(self, input_ids: Tensor, position_ids: Tensor, tokentype_ids: int | None = None) -> Tensor:
        return super().forward(input_ids, position_ids, tokentype_ids) * self.scale


class LayerNormEmbedding(_AdoptingEmbedding):
    """LayerNorm (weight 1, bias 0 at init) on the embedding output."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embed_norm = LayerNorm(self.config, self.config.hidden_size, eps=self.config.layernorm_epsilon)

    def forward(self, input_ids: Tensor, position_ids: Tensor, tokentype_ids: int | None = None) -> Tensor:
        return self.embed_norm(super().forward(input_ids, position_ids, tokentype_ids))


EMBEDDINGS: dict[str, type[_AdoptingEmbedding] | None] = {
    "vanilla": None,
    "scaled": ScaledEmbedding,
    "layernorm": LayerNormEmbedding,
}


class GPTModelWithEmbedding(GPTModel):
    """megatron-core GPTModel whose embedding is one of the paper's variants."""

    def __init__(self, *args, embedding: str = "vanilla", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embedding_variant = embedding
        variant = EMBEDDINGS[embedding]
        if variant is not None and self.pre_process:
            self.embedding = variant.adopt(self.embedding)
