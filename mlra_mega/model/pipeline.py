"""The model split over pipeline stages: which layers a stage holds, its init, its names.

A stage is a megatron-core GPTModel built with `pre_process` (the embedding) on the first stage,
`post_process` (final norm, output layer) on the last, and only its own transformer layers.

- Layers per stage: `pipeline_split` (even, or `parallel.pipeline_layers` = [first, last]).
- Init: every rank draws its weights from one seeded generator in construction order (embedding,
  layer 1 .. L, output layer). A stage replays the draws of everything built before it (a
  throwaway embedding and throwaway layers, one at a time, so a stage never holds more than one
  extra layer), so the model at any PP equals the model at PP=1 bit for bit.
- Names: a stage's state_dict numbers its layers from 0; `global_name` gives the PP=1 name
  (layer index plus the stage's offset; the last stage's copy of a tied output matrix is the
  word embedding). Checkpoint export, diagnostics and tests use these.
"""

from __future__ import annotations

import re

import torch

from mlra_mega.config import ModelConfig

__all__ = ["is_tied_copy", "layer_offset", "global_name", "global_layer_index", "replay_init_before_stage"]

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def layer_offset(model: torch.nn.Module) -> int:
    """The global index of this stage's first transformer layer (0 on the first stage)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = model.config
    if config.pipeline_model_parallel_size == 1:
        return 0
    return int(get_transformer_layer_offset(config))


def is_tied_copy(model: torch.nn.Module, name: str) -> bool:
    """The last stage's copy of the word embeddings that serves as the tied output layer."""
    return (bool(getattr(model, "share_embeddings_and_output_weights", False))
            and not getattr(model, "pre_process", True) and name.endswith("output_layer.weight"))


def global_name(name: str, offset: int, tied_copy: bool = False) -> str:
    """The PP=1 model's name of a stage's parameter or state_dict key."""
    if tied_copy:
        return name.replace("output_layer.weight", "embedding.word_embeddings.weight")
    m = _LAYER.match(name)
    if m is None or not offset:
        return name
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"


def global_layer_index(name: str, offset: int) -> int | None:
    """The global 0-based transformer layer a (local) name belongs to, or None."""
    m = _LAYER.match(name)
    return None if m is None else int(m.group(2)) + offset


def replay_init_before_stage(cfg: ModelConfig, tcfg, layers_before: int, first_stage: bool) -> None:
    """Draws (and drops) the weights that the stages before this one build, in PP=1 order."""
    from dataclasses import replace

    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from mlra_mega.model.specs import layer_spec

    if first_stage:
        return
    one_stage = replace(tcfg, pipeline_model_parallel_size=1, num_layers_in_first_pipeline_stage=None,
                        num_layers_in_last_pipeline_stage=None)
    with torch.no_grad():
        del_me = LanguageModelEmbedding(config=one_stage, vocab_size=cfg.padded_vocab_size,
                                        max_sequence_length=cfg.max_positions,
                                        position_embedding_type="learned_absolute" if cfg.learned_positions
                                        else "rope")
        del del_me
        spec = layer_spec(cfg)
        for number in range(1, layers_before + 1):
            layer = build_module(spec, config=one_stage, layer_number=number)
            del layer
