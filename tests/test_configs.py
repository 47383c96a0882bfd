"""The shipped model configs: the Llama-block sizes hold the parameters their names say (32,000-token
vocabulary), as the built model counts them, and every config under configs/llama loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlra_mega.config import load_config
from mlra_mega.model.build import count_parameters

LLAMA = Path(__file__).resolve().parent.parent / "configs" / "llama"

# config -> parameters in millions, MHA and MLRA (r = d_head adds each head's B factor), at vocabulary 32,000
SIZES = {"125m.yaml": (124.67, 125.65), "350m.yaml": (336.12, 338.48), "1.3b.yaml": (1303.49, 1313.71)}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_llama_sizes_hold_the_parameters_their_names_say(name: str) -> None:
    for attention, millions in zip(("mha", "mlra"), SIZES[name]):
        cfg = load_config(LLAMA / name, ["model.vocab_size=32000", f"model.attention={attention}"])
        assert cfg.model.arch == "llama" and not cfg.model.tied_embeddings and cfg.model.kv_heads == 4
        assert count_parameters(cfg.model) / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.parametrize("attention", ["mha", "mlra"])
def test_the_125m_model_as_built_has_the_counted_parameters(attention: str) -> None:
    from mlra_mega import distributed
    from mlra_mega.config import ParallelConfig
    from mlra_mega.model.build import build_model

    cfg = load_config(LLAMA / "125m.yaml", ["model.vocab_size=32000", f"model.attention={attention}",
                                             "model.attention_backend=local", "model.fusions=off"])
    distributed.setup(ParallelConfig(), seed=0)
    try:
        model = build_model(cfg.model)
        assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model)
    finally:
        distributed.teardown()


def test_every_llama_config_loads() -> None:
    names = sorted(p.name for p in LLAMA.glob("*.yaml"))
    assert names == ["1.3b.yaml", "125m.yaml", "350m.yaml", "tiny.yaml"]
    for name in names:
        assert load_config(LLAMA / name, ["model.vocab_size=32000"]).model.arch == "llama"
