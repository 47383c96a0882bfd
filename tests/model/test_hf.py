"""Hugging Face GPT-2 export: same logits (padding rows included), clear refusals, TP > 1 too."""

from __future__ import annotations

import pytest
import torch

from mlra_mega.config import ConfigError
from mlra_mega.model.build import build_model
from mlra_mega.model.convert import load_shard
from mlra_mega.model.hf import to_hf
from tests.dist import dist_case, dist_result
from tests.model.helpers import VOCAB, large_weights, tiny_cfg, tokens

TOL = 1e-5

EXPORTABLE = [
    dict(attention="mha"),
    dict(attention="mha", tied=False),
    dict(attention="mlra"),
    dict(attention="mlra", tied=False),
    dict(attention="mlra", tied=False, factorize=("q", "k", "v", "o"), rank=8),
    dict(attention="mha", embedding="scaled", tied=False),
    dict(attention="mlra", embedding="scaled", tied=False),
]


@pytest.mark.parametrize("case", EXPORTABLE, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_export_gives_our_logits(tp1: None, case: dict) -> None:
    cfg = tiny_cfg(**case)
    model = build_model(cfg).eval()
    load_shard(model, large_weights(model))
    ids, positions, _ = tokens()
    ours = model(ids, positions, None)
    hf = to_hf(model, cfg)
    assert hf.config.vocab_size == cfg.padded_vocab_size > VOCAB and hf.config.tie_word_embeddings == cfg.tied_embeddings
    with torch.no_grad():
        theirs = hf(ids).logits
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= TOL


@pytest.mark.parametrize("case,words", [
    (dict(embedding="layernorm"), "Embed LN"),
    (dict(embedding="layernorm", tied=False, attention="mlra"), "Embed LN"),
    (dict(embedding="scaled", tied=True), "model.tie_embeddings=false"),
])
def test_unrepresentable_variants_refuse(tp1: None, case: dict, words: str) -> None:
    cfg = tiny_cfg(**case)
    model = build_model(cfg)
    with pytest.raises(ConfigError, match="model.embedding") as info:
        to_hf(model, cfg)
    assert words in str(info.value)


@dist_case(2)
def export_at_tp2() -> float:
    from megatron.core import parallel_state

    from mlra_mega import distributed
    from mlra_mega.config import ParallelConfig
    from mlra_mega.model.convert import partition_dims, shard_state_dict

    cfg = tiny_cfg("mlra", tied=False)
    distributed.setup(ParallelConfig(tensor=1), seed=1)
    full = large_weights(build_model(cfg))
    distributed.setup(ParallelConfig(tensor=2), seed=1)
    try:
        model = build_model(cfg).eval()
        load_shard(model, shard_state_dict(full, partition_dims(model), 2,
                                           parallel_state.get_tensor_model_parallel_rank()))
        ids, positions, _ = tokens()
        local = model(ids, positions, None)
        parts = [torch.empty_like(local) for _ in range(2)]
        torch.distributed.all_gather(parts, local.detach().contiguous(),
                                     group=parallel_state.get_tensor_model_parallel_group())
        ours = torch.cat(parts, dim=-1)
        with torch.no_grad():
            theirs = to_hf(model, cfg)(ids).logits
        return (theirs - ours).abs().max().item()
    finally:
        distributed.teardown(keep_process_group=True)


@pytest.mark.slow
def test_export_from_tp2_gathers_first() -> None:
    for err in dist_result(__name__, 2, "export_at_tp2"):
        assert err <= TOL


@dist_case(2)
def init_from_at_tp2() -> dict[str, float]:
    """Each TP rank loads its shards of a GPT-2 directory (`model.init_from`); gathered, they are the
    full state dict the import computes, for MHA and for MLRA (its SVD factors)."""
    import tempfile

    import transformers
    from megatron.core import parallel_state

    from mlra_mega import distributed
    from mlra_mega.config import ParallelConfig
    from mlra_mega.model.convert import full_state_dict
    from mlra_mega.model.hf_import import init_from_hf, load_hf_weights
    from tests.model.helpers import SEQ

    out = {}
    distributed.setup(ParallelConfig(tensor=2), seed=1)
    try:
        with tempfile.TemporaryDirectory() as mine:
            where = [mine]
            torch.distributed.broadcast_object_list(where, src=0)  # rank 0's directory, seen by both
            tmp = where[0]
            if torch.distributed.get_rank() == 0:
                torch.manual_seed(0)
                config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
                                                 activation_function="gelu_new")
                transformers.GPT2LMHeadModel(config).save_pretrained(tmp)
            torch.distributed.barrier()
            for attention in ("mha", "mlra"):
                cfg = tiny_cfg(attention)
                model = build_model(cfg)
                load_hf_weights(model, tmp, cfg, 2, parallel_state.get_tensor_model_parallel_rank(), log=lambda s: None)
                got = full_state_dict(model, parallel_state.get_tensor_model_parallel_group())
                want, _ = init_from_hf(tmp, cfg)
                out[attention] = max((got[k] - want[k]).abs().max().item() for k in want)
            torch.distributed.barrier()  # rank 0 removes its directory only once both have read it
    finally:
        distributed.teardown(keep_process_group=True)
    return out


@pytest.mark.slow
def test_init_from_at_tp2_loads_each_ranks_shards() -> None:
    for errs in dist_result(__name__, 2, "init_from_at_tp2"):
        assert errs == {"mha": 0.0, "mlra": 0.0}


# Llama blocks on an odd shape: hidden 96, 3 heads of 32, one key/value head (multi-query), a
# vocabulary of 301 padded to 384, a non-default rotary base; MHA and MLRA (whose k and v are one
# factored head each).
LLAMA_ODD = dict(num_layers=2, hidden_size=96, num_heads=3, num_kv_heads=1, vocab_size=301, rotary_base=5000.0)

LLAMA_EXPORTABLE = [
    dict(attention="mha"),
    dict(attention="mha", tied=True),
    dict(attention="mlra"),
    dict(attention="mlra", factorize=("q", "k", "v", "o"), rank=8),
    dict(attention="mlra", factorize=("k",), rank=4, embedding="scaled"),
    dict(attention="mha", num_kv_heads=3, backend="sdpa"),
]


@pytest.mark.parametrize("case", LLAMA_EXPORTABLE, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_llama_export_gives_our_logits(tp1: None, case: dict) -> None:
    from transformers import LlamaForCausalLM

    case = dict(case)
    tied = case.pop("tied", None)
    cfg = tiny_cfg(**{**LLAMA_ODD, "arch": "llama", "tied": tied, **case})
    assert cfg.tied_embeddings is bool(tied)  # llama's default: untied
    model = build_model(cfg).eval()
    load_shard(model, large_weights(model, std=0.2))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 301, (2, 19), generator=g)
    positions = torch.arange(19).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ours = model(ids, positions, None)
    hf = to_hf(model, cfg)
    assert isinstance(hf, LlamaForCausalLM)
    assert (hf.config.vocab_size, hf.config.num_key_value_heads) == (384, cfg.kv_heads)
    with torch.no_grad():
        theirs = hf(ids).logits
    assert theirs.shape == ours.shape == (2, 19, 384)
    assert (theirs - ours).abs().max().item() <= TOL, (theirs - ours).abs().max().item()
