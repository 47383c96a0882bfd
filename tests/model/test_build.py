"""The builder: parameter counts and FLOPs against the real model, init, and ConfigErrors."""

from __future__ import annotations

import math

import pytest
import torch

from mlra_mega.config import ConfigError, ModelConfig, load_config
from mlra_mega.model.build import build_model, count_parameters, flops_per_token, forward_flops_per_token
from tests.model.helpers import LLAMA_VARIANTS, VARIANTS, llama_cfg, llama_id, tiny_cfg, tokens, variant_id

# Every gpt2 variant, and every llama one (grouped-query heads, SwiGLU, RMSNorm, no biases):
# name -> (config maker, variant)
ALL = {**{variant_id(v): (lambda v=v: tiny_cfg(*v), v) for v in VARIANTS},
       **{llama_id(v): (lambda v=v: llama_cfg(v), v) for v in LLAMA_VARIANTS}}


def _cfg(name: str):
    return ALL[name][0]()


@pytest.mark.parametrize("variant", list(ALL))
def test_parameter_count_is_exact(tp1: None, variant: str) -> None:
    cfg = _cfg(variant)
    model = build_model(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


# torch's FlopCounterMode does not count the CPU SDPA kernel, so the SDPA variants are left out.
@pytest.mark.parametrize("variant", [n for n, (_, v) in ALL.items() if "sdpa" not in v])
def test_flops_match_the_counted_matmuls(tp1: None, variant: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _cfg(variant)
    model = build_model(cfg)
    ids, positions, labels = tokens()
    with FlopCounterMode(display=False) as forward:
        loss = model(ids, positions, None, labels=labels).mean()
    assert forward.get_total_flops() == forward_flops_per_token(cfg) * ids.numel()
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    total = forward.get_total_flops() + backward.get_total_flops()
    assert total == flops_per_token(cfg) * ids.numel()


def test_mlra_saves_attention_flops_at_small_rank() -> None:
    mha = ModelConfig(hidden_size=768, num_heads=12, vocab_size=50257, num_layers=12)
    mlra = ModelConfig(hidden_size=768, num_heads=12, vocab_size=50257, num_layers=12, attention="mlra")
    assert count_parameters(mha) == 124_475_904  # GPT-2 small with 50304 padded rows
    # r = d_head: A (d x r) and B (r x d_head) per head cost d*d + d*d_head per projection.
    assert count_parameters(mlra) - count_parameters(mha) == 12 * 3 * 12 * 64 * 64


def _std(t: torch.Tensor) -> float:
    return t.float().std().item()


def test_init_follows_gpt2(tp1: None) -> None:
    cfg = tiny_cfg("mlra", factorize=("q", "k", "v", "o"), rank=16, hidden_size=128, num_layers=4,
                   qkv_init_std=0.05)
    params = dict(build_model(cfg).named_parameters())
    residual = 0.02 / math.sqrt(2 * 4)
    layer = "decoder.layers.1."
    expect = {
        "embedding.word_embeddings.weight": 0.02,
        "embedding.position_embeddings.weight": 0.02,
        layer + "self_attention.linear_a.weight": 0.05,      # A factors of Q/K/V: qkv_init_std
        layer + "self_attention.linear_b_q.weight": 0.05,    # B factors too
        layer + "self_attention.linear_proj.linear_a.weight": 0.02,
        layer + "self_attention.linear_proj.linear_b.weight": residual,
        layer + "mlp.linear_fc1.weight": 0.02,
        layer + "mlp.linear_fc2.weight": residual,
    }
    for name, std in expect.items():
        assert _std(params[name]) == pytest.approx(std, rel=0.08), name
    for name, p in params.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        if "layernorm" in name and name.endswith("weight"):
            assert torch.all(p == 1), name


def test_residual_scaling_can_be_turned_off(tp1: None) -> None:
    cfg = tiny_cfg(hidden_size=128, num_layers=4, scale_residual_init=False)
    params = dict(build_model(cfg).named_parameters())
    assert _std(params["decoder.layers.0.self_attention.linear_proj.weight"]) == pytest.approx(0.02, rel=0.08)
    assert _std(params["decoder.layers.0.self_attention.linear_qkv.weight"]) == pytest.approx(0.02, rel=0.08)


def test_variants_start_from_identical_weights(tp1: None) -> None:
    """Seeded alike, vanilla / scaled / layernorm differ only by the embedding LayerNorm."""
    import random

    import numpy as np

    def build(embedding: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(5), random.seed(5), np.random.seed(5)
        return {n: p.detach().clone() for n, p in build_model(tiny_cfg(embedding=embedding)).named_parameters()}

    vanilla, scaled, ln = build("vanilla"), build("scaled"), build("layernorm")
    assert vanilla.keys() == scaled.keys() and set(ln) - set(vanilla) == {"embedding.embed_norm.weight",
                                                                         "embedding.embed_norm.bias"}
    for name in vanilla:
        assert torch.equal(vanilla[name], scaled[name]) and torch.equal(vanilla[name], ln[name]), name


def test_embedding_variants_act_on_the_embedding_output(tp1: None) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(embedding="scaled"))
    ids, positions, _ = tokens()
    emb = model.embedding
    raw = emb.word_embeddings(ids) + emb.position_embeddings(positions)
    torch.testing.assert_close(emb(ids, positions), raw.transpose(0, 1) * 8.0)  # sqrt(64)
    model = build_model(tiny_cfg(embedding="layernorm"))
    emb = model.embedding
    raw = (emb.word_embeddings(ids) + emb.position_embeddings(positions)).transpose(0, 1)
    torch.testing.assert_close(emb(ids, positions), torch.nn.functional.layer_norm(raw, (64,), eps=1e-5))


def test_sdpa_backend_equals_local(tp1: None) -> None:
    from mlra_mega.model.convert import load_shard
    from tests.model.helpers import large_weights

    ids, positions, _ = tokens()
    local = build_model(tiny_cfg("mlra")).eval()
    weights = large_weights(local)
    load_shard(local, weights)
    sdpa = build_model(tiny_cfg("mlra", backend="sdpa")).eval()
    load_shard(sdpa, weights)
    torch.testing.assert_close(sdpa(ids, positions, None), local(ids, positions, None), atol=1e-5, rtol=0)


MODEL_ERRORS = [
    ({"hidden_size": 64, "num_heads": 5}, 1, "model.num_heads", "do not divide hidden_size"),
    ({"num_heads": 4}, 3, "parallel.tensor", "does not divide model.num_heads"),
    ({"num_heads": 4, "vocab_size": 202, "vocab_multiple": 2}, 4, "parallel.tensor", "padded vocabulary"),
    ({"mlra": {"rank": 0}}, 1, "model.mlra.rank", "must be >= 1"),
    ({"mlra": {"factorize": ["q", "z"]}}, 1, "model.mlra.factorize", "unknown projection"),
    ({"attention": "mla"}, 1, "model.attention", "did you mean 'mlra'"),
    ({"embedding": "embed_ln"}, 1, "model.embedding", "not one of"),
    ({"attention_backend": "flash"}, 1, "model.attention_backend", "not one of"),
    ({"vocab_size": None}, 1, "model.vocab_size", "is not set"),
]


@pytest.mark.parametrize("fields,tp,field,words", MODEL_ERRORS, ids=[e[2] + ":" + e[3] for e in MODEL_ERRORS])
def test_model_config_errors(tp1: None, fields: dict, tp: int, field: str, words: str) -> None:
    from mlra_mega.config import from_dict

    base = {"num_layers": 1, "hidden_size": 64, "num_heads": 4, "vocab_size": 200}
    with pytest.raises(ConfigError) as info:
        cfg = from_dict(ModelConfig, {**base, **fields}, "model.")
        build_model(cfg, tensor_parallel=tp)
    assert info.value.field == field and words in str(info.value) and info.value.fix


def test_configs_built_in_code_are_checked_too(tp1: None) -> None:
    cfg = tiny_cfg()
    cfg.attention = "gqa"
    with pytest.raises(ConfigError, match="model.attention: 'gqa' is not one of"):
        build_model(cfg)


def test_run_config_checks_tp_against_the_model() -> None:
    with pytest.raises(ConfigError, match="parallel.tensor: 8 does not divide model.num_heads 12"):
        load_config(None, ["model.vocab_size=1000", "parallel.tensor=8"])


def test_build_refuses_a_tp_other_than_the_initialised_one(tp1: None) -> None:
    with pytest.raises(ConfigError, match="differs from the initialised tensor-parallel size 1"):
        build_model(tiny_cfg(), tensor_parallel=2)


def test_no_fusions_without_cuda_or_when_off() -> None:
    from mlra_mega.model.build import fusion_flags

    assert not any(fusion_flags(tiny_cfg(fusions="off")).values())
    auto = fusion_flags(tiny_cfg(fusions="auto"))
    assert auto["gradient_accumulation_fusion"] is False  # DeepSpeed has no main_grad
    if not torch.cuda.is_available():
        assert not any(auto.values())
