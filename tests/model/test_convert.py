"""Full <-> shard conversion, and MLRA equal to MHA with the composed Q/K/V (and O) weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mlra_mega.model.build import build_model
from mlra_mega.model.convert import (full_state_dict, load_shard, merge_shards, mlra_to_mha, partition_dims,
                                     shard_state_dict)
from tests.model.helpers import large_weights, tiny_cfg, tokens


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_then_merge_is_the_identity(tp1: None, tp: int) -> None:
    model = build_model(tiny_cfg("mlra", factorize=("q", "k", "v", "o"), rank=8, tied=False))
    dims = partition_dims(model)
    full = large_weights(model)
    shards = [shard_state_dict(full, dims, tp, r) for r in range(tp)]
    assert shards[0]["embedding.word_embeddings.weight"].shape == (256 // tp, 64)
    assert shards[0]["decoder.layers.0.self_attention.linear_b_q.weight"].shape == (4 // tp, 8, 16)
    assert shards[0]["decoder.layers.0.self_attention.linear_proj.linear_b.weight"].shape == (64, 4 * 8 // tp)
    assert torch.equal(shards[0]["decoder.final_layernorm.weight"], shards[-1]["decoder.final_layernorm.weight"])
    merged = merge_shards(shards, dims)
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_shard_errors(tp1: None) -> None:
    model = build_model(tiny_cfg())
    dims = partition_dims(model)
    full = large_weights(model)
    with pytest.raises(ValueError, match="does not split over TP=3"):
        shard_state_dict(full, dims, 3, 0)
    del full["decoder.final_layernorm.bias"]
    with pytest.raises(KeyError, match="lacks"):
        shard_state_dict(full, dims, 2, 0)
    with pytest.raises(KeyError, match="missing"):
        load_shard(model, full)


MLRA_CASES = [
    dict(attention="mlra"),
    dict(attention="mlra", tied=False, embedding="scaled"),
    dict(attention="mlra", factorize=("q", "k", "v", "o"), rank=8),
    dict(attention="mlra", factorize=("k",), rank=4),
    dict(attention="mlra", factorize=("v", "o"), rank=32),
    # llama blocks with grouped-query attention: k and v factored per key/value head
    dict(attention="mlra", arch="llama", num_heads=8, num_kv_heads=2, tied=None),
    dict(attention="mlra", arch="llama", num_heads=8, num_kv_heads=1, tied=None, factorize=("k", "v", "o"), rank=4),
    dict(attention="mlra", arch="llama", num_heads=4, num_kv_heads=2, tied=None, factorize=("q",), rank=8),
]


@pytest.mark.parametrize("case", MLRA_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_mlra_equals_mha_with_composed_weights(tp1: None, case: dict) -> None:
    cfg = tiny_cfg(**case)
    mlra = build_model(cfg).eval()
    load_shard(mlra, large_weights(mlra))
    mha_cfg = dataclasses.replace(cfg, attention="mha")
    mha = build_model(mha_cfg).eval()
    load_shard(mha, mlra_to_mha(full_state_dict(mlra), cfg))
    ids, positions, _ = tokens()
    ours, composed = mlra(ids, positions, None), mha(ids, positions, None)
    assert ours.abs().max() > 1.0  # large weights: a real function, not a near-constant
    assert (ours - composed).abs().max().item() <= 1e-5
    if cfg.arch == "llama":  # and back: each head's SVD at r >= its rank is exact
        from mlra_mega.model.convert import mha_to_mlra

        if cfg.mlra_rank == cfg.head_dim:
            again = build_model(cfg).eval()
            back, errors = mha_to_mlra(full_state_dict(mha), cfg)
            load_shard(again, back)
            assert max(errors) < 1e-6
            assert (again(ids, positions, None) - ours).abs().max().item() <= 1e-4


def test_composition_order_matters(tp1: None) -> None:
    """Composing B A instead of A B (or mixing heads) must not pass: the test can fail."""
    cfg = tiny_cfg("mlra")
    mlra = build_model(cfg).eval()
    load_shard(mlra, large_weights(mlra))
    full = full_state_dict(mlra)
    b = full["decoder.layers.0.self_attention.linear_b_q.weight"]
    full["decoder.layers.0.self_attention.linear_b_q.weight"] = b.flip(0)  # heads swapped
    mha = build_model(dataclasses.replace(cfg, attention="mha")).eval()
    load_shard(mha, mlra_to_mha(full, cfg))
    ids, positions, _ = tokens()
    assert (mlra(ids, positions, None) - mha(ids, positions, None)).abs().max().item() > 1e-2
