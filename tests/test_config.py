"""Config loading: YAML, dotted overrides with type conversion, and every ConfigError case."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlra_mega.config import ConfigError, ModelConfig, RunConfig, flatten, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg == RunConfig()


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  hidden_size: 128\n  num_heads: 4\n  vocab_size: 1000\ntrain:\n  steps: 5\n")
    cfg = load_config(path, ["train.steps=7", "model.mlra.rank=8", "optim.lr=1e-3"])
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.train.steps) == (128, 4, 7)
    assert cfg.model.mlra.rank == 8 and cfg.optim.lr == 1e-3


def test_override_types_are_converted() -> None:
    cfg = load_config(None, [
        "model.tie_embeddings=false", "model.hidden_dropout=0.1", "optim.betas=[0.8, 0.99]",
        "model.mlra.factorize=q,k,v,o", "model.vocab_size=null", "run.name=007", "metrics.peak_tflops=989",
        "model.attention=mlra",
    ])
    assert cfg.model.tie_embeddings is False
    assert cfg.model.hidden_dropout == 0.1
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.model.mlra.factorize == ["q", "k", "v", "o"]
    assert cfg.model.vocab_size is None
    assert cfg.run.name == "007"  # a str field keeps the text as written
    assert cfg.metrics.peak_tflops == 989.0 and isinstance(cfg.metrics.peak_tflops, float)
    assert cfg.model.attention == "mlra"


def test_yaml_types_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: 2.0\noptim:\n  lr: 1\n")
    cfg = load_config(path)
    assert cfg.train.steps == 2 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_derived_model_sizes() -> None:
    m = ModelConfig(hidden_size=768, num_heads=12, vocab_size=50257, seq_length=256)
    assert m.head_dim == 64 and m.mlra_rank == 64 and m.ffn_size == 3072 and m.max_positions == 256
    assert m.padded_vocab_size == 50304  # ceil(50257 / 128) * 128
    assert m.tied_embeddings and m.learned_positions and m.kv_heads == 12


def test_llama_defaults_follow_the_block_type() -> None:
    m = ModelConfig(arch="llama", hidden_size=4096, num_heads=32, num_kv_heads=8)
    assert m.ffn_size == 11008  # Llama's: 8/3 d rounded up to a multiple of 256
    assert not m.tied_embeddings and not m.learned_positions and m.kv_heads == 8
    assert ModelConfig(arch="llama", hidden_size=768, num_heads=12).ffn_size == 2048
    assert ModelConfig(arch="llama", tie_embeddings=True).tied_embeddings
    # A checkpoint written before `arch` existed compares equal to today's gpt2 config of it.
    from mlra_mega.config import model_identity

    old = {"model": {"num_layers": 2, "tie_embeddings": True}}
    assert model_identity(old) == model_identity({"model": {"num_layers": 2, "arch": "gpt2"}})
    assert model_identity(old) != model_identity({"model": {"num_layers": 2, "arch": "llama"}})


def test_to_dict_and_flatten_round_trip(tmp_path: Path) -> None:
    import yaml

    cfg = load_config(None, ["model.num_layers=3", "optim.betas=[0.9,0.98]"])
    path = write(tmp_path, yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg
    flat = flatten(cfg)
    assert flat["model.num_layers"] == 3 and flat["model.mlra.factorize"] == ["q", "k", "v"]
    assert load_config(None, [f"{k}={v}" for k, v in flat.items() if k == "optim.betas"]).optim.betas == (0.9, 0.98)


def test_quickstart_config_loads() -> None:
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert cfg.model.attention == "mlra" and cfg.model.vocab_size is None  # taken from the tokenizer


ERROR_CASES = [
    # (overrides, field named, words in the message)
    (["model.hiden_size=3"], "model.hiden_size", "did you mean 'model.hidden_size'"),
    (["hidden_size=64"], "hidden_size", "did you mean 'model.hidden_size'"),
    (["trian.steps=3"], "trian", "did you mean 'train'"),
    (["model.mlra.rnak=3"], "model.mlra.rnak", "did you mean 'model.mlra.rank'"),
    (["model.attention=mlr"], "model.attention", "did you mean 'mlra'"),
    (["model.embedding=scale"], "model.embedding", "did you mean 'scaled'"),
    (["model.num_heads=5"], "model.num_heads", "do not divide hidden_size"),
    (["model.num_layers=0"], "model.num_layers", "must be >= 1"),
    (["model.mlra.rank=0"], "model.mlra.rank", "must be >= 1"),
    (["model.mlra.factorize=q,x"], "model.mlra.factorize", "unknown projection 'x'"),
    (["model.mlra.factorize=q,q"], "model.mlra.factorize", "twice"),
    (["model.mlra.factorize=[]"], "model.mlra.factorize", "is empty"),
    (["model.hidden_dropout=1.5"], "model.hidden_dropout", "[0, 1)"),
    (["model.init_std=0"], "model.init_std", "must be > 0"),
    (["model.seq_length=64", "model.max_position_embeddings=32"], "model.max_position_embeddings", "shorter"),
    (["train.steps=ten"], "train.steps", "expected an integer"),
    (["train.steps=true"], "train.steps", "expected an integer"),
    (["model.tie_embeddings=maybe"], "model.tie_embeddings", "expected true or false"),
    (["optim.lr=fast"], "optim.lr", "expected a number"),
    (["optim.betas=[0.9]"], "optim.betas", "expected 2 values"),
    (["optim.betas=[0.9,1.2]"], "optim.betas", "beta2"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size", "not a multiple"),
    (["zero.stage=4"], "zero.stage", "0, 1, 2 or 3"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel", "needs tensor parallelism"),
    (["parallel.tensor=5"], "parallel.tensor", "does not divide model.num_heads"),
    (["model.vocab_size=1000", "model.vocab_multiple=6", "model.num_heads=4", "model.hidden_size=64",
      "parallel.tensor=4"], "parallel.tensor", "padded vocabulary"),
    (["metrics.tev_interval=-1"], "metrics.tev_interval", "must be >= 0"),
    (["metrics.comm_interval=-2"], "metrics.comm_interval", "must be >= 0"),
    (["model.arch=lama"], "model.arch", "did you mean 'llama'"),
    (["model.num_kv_heads=4"], "model.num_kv_heads", "set model.arch=llama"),
    (["model.arch=llama", "model.num_kv_heads=5"], "model.num_kv_heads", "do not divide num_heads 12"),
    (["model.arch=llama", "model.hidden_size=60", "model.num_heads=4"], "model.num_heads", "even head size"),
    (["model.arch=llama", "model.rotary_base=0"], "model.rotary_base", "must be > 0"),
    (["model.arch=llama", "model.num_heads=8", "model.hidden_size=64", "model.num_kv_heads=2", "parallel.tensor=4"],
     "parallel.tensor", "does not divide model.num_kv_heads 2"),
    (["model=3"], "model", "expected a mapping"),
    (["model.hidden_size.x=3"], "model.hidden_size", "not a section"),
    (["steps"], "override", "section.key=value"),
]


@pytest.mark.parametrize("overrides,field,words", ERROR_CASES, ids=[c[0][-1] for c in ERROR_CASES])
def test_config_errors_name_field_and_fix(overrides: list[str], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.field == field
    assert words in str(info.value)
    assert info.value.fix, "every ConfigError says how to fix it"
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_config(write(tmp_path, "model:\n  hidden_size: [1\n"))
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(write(tmp_path, "model:\n  hidden: 3\n"))


def test_every_key_has_a_help_and_config_keys_lists_them(capsys: pytest.CaptureFixture[str]) -> None:
    from mlra_mega.cli import main
    from mlra_mega.config import _all_dotted_keys, describe_keys

    described = describe_keys()
    assert [k for k, *_ in described] == _all_dotted_keys()
    assert all(text.strip() for *_, text in described), [k for k, *_, text in described if not text.strip()]
    assert ("train.steps", "int", 100, "optimizer steps of the run") in described
    assert main(["config", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(described) and lines[0].startswith("model.arch")
    assert any(line.startswith("model.attention ") and "mha|mlra" in line for line in lines)


def test_a_replaced_key_names_its_replacement_and_saved_configs_migrate() -> None:
    from mlra_mega.config import migrate_saved, to_dict

    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: was replaced by train.recompute "
                                          r"\(fix: write train.recompute=full \(for True\) or none \(for False\)\)"):
        load_config(None, ["train.activation_checkpointing=true"])
    saved = to_dict(load_config(None, []))
    saved["train"].pop("recompute")
    saved["train"]["activation_checkpointing"] = True  # a checkpoint's sidecar from before the change
    assert from_dict(RunConfig, migrate_saved(saved)).train.recompute == "full"
    assert load_config(None, ["train.recompute=selective"]).train.recompute == "selective"
    with pytest.raises(ConfigError, match="train.recompute_num_layers: 9 is more than the model's"):
        load_config(None, ["train.recompute=full", "train.recompute_num_layers=9", "model.num_layers=2"])
