"""Generation: greedy tokens from a TP=2 checkpoint equal those of its Hugging Face export and of a
full forward per token (no cache: the KV cache changes nothing); sampling with a seed repeats;
Embed LN and tied Scaled Embed checkpoints generate (they have no GPT-2 form); the sampler's
filters; bad input is one line."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from mlra_mega import distributed
from mlra_mega.cli import main
from mlra_mega.config import ConfigError, ParallelConfig, load_config
from mlra_mega.generate import SamplingOptions, generate, load_source, next_token
from tests.train.test_checkpoint import overrides

PROMPT = "Return the number of items"
NEW = 12


@contextlib.contextmanager
def one_process():
    distributed.setup(ParallelConfig(tensor=1), seed=0)
    try:
        yield
    finally:
        distributed.teardown()


def tokens_of(source: Path, opts: SamplingOptions) -> list[int]:
    """The continuation's ids; the end-of-document id does not stop it (an undertrained model may
    emit it first, and the comparison would then hold no token)."""
    with one_process():
        src = load_source(source)
        src.eod = -1
        return generate(src, PROMPT, opts)


def greedy_without_cache(source: Path) -> list[int]:
    """Greedy, with a full forward over the whole sequence for every new token."""
    from mlra_mega.export import load_checkpoint_model

    with one_process():
        model, _, ckpt = load_checkpoint_model(source)
        src = load_source(source)
        ids = src.tokenizer.encode_one(PROMPT)
        out = []
        with torch.no_grad():
            for _ in range(NEW):
                seq = torch.tensor([ids + out])
                logits = model(seq, torch.arange(seq.shape[1]).unsqueeze(0), None)
                out.append(int(torch.argmax(logits[0, -1, :src.tokenizer.vocab_size])))
        return out


@pytest.mark.slow  # the TP=2 checkpoint is a torchrun run (shared with the elastic tests)
def test_greedy_from_a_tp2_checkpoint_equals_its_export_and_the_uncached_model(elastic_straight: Path,
                                                                                tmp_path: Path) -> None:
    from mlra_mega.export import export_hf

    ckpt = elastic_straight / "checkpoints"
    hf = export_hf(ckpt, tmp_path / "hf", log=lambda s: None)
    greedy = SamplingOptions(max_new_tokens=NEW, temperature=0)
    ours = tokens_of(ckpt, greedy)
    assert len(ours) == NEW
    assert ours == tokens_of(hf, greedy)
    assert ours == greedy_without_cache(ckpt)
    sampled = SamplingOptions(max_new_tokens=NEW, temperature=1.0, top_k=40, top_p=0.95, seed=7)
    first = tokens_of(ckpt, sampled)
    assert first == tokens_of(ckpt, sampled), "sampling with one seed did not repeat"
    assert first == tokens_of(hf, sampled), "the export sampled otherwise"


def test_a_llama_checkpoint_generates_as_its_llama_export_and_the_uncached_model(llama_run: Path,
                                                                                tmp_path: Path) -> None:
    from mlra_mega.export import export_hf

    hf = export_hf(llama_run, tmp_path / "hf", log=lambda s: None)
    assert '"LlamaForCausalLM"' in (hf / "config.json").read_text()
    greedy = SamplingOptions(max_new_tokens=NEW, temperature=0)
    ours = tokens_of(llama_run, greedy)
    assert len(ours) == NEW
    assert ours == greedy_without_cache(llama_run), "rotary positions under the KV cache differ from a full forward"
    assert ours == tokens_of(hf, greedy)
    sampled = SamplingOptions(max_new_tokens=NEW, temperature=1.0, top_k=40, top_p=0.95, seed=7)
    assert tokens_of(llama_run, sampled) == tokens_of(hf, sampled), "the export sampled otherwise"


@pytest.mark.parametrize("embedding", ["layernorm", "scaled"])
def test_embed_ln_and_tied_scaled_embed_checkpoints_generate(embedding: str, tmp_path: Path, tokenizer_dir: Path,
                                                             sample_dataset: str) -> None:
    from mlra_mega.train.run import train

    run = tmp_path / "run"
    train(load_config(None, overrides(tokenizer_dir, sample_dataset, run, "tracking.enabled=false",
                                      f"model.embedding={embedding}", "model.tie_embeddings=true",
                                      "train.steps=2", "checkpoint.interval=2")), log=lambda s: None)
    assert tokens_of(run, SamplingOptions(max_new_tokens=NEW, temperature=0)) == greedy_without_cache(run)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "4", "--seed", "1"]) == 0
    assert out.getvalue().endswith("\n")


def test_the_sampler_filters() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, SamplingOptions(temperature=0), g) == 1
    assert {next_token(logits, SamplingOptions(top_k=1), g) for _ in range(20)} == {1}
    assert {next_token(logits, SamplingOptions(top_k=2), g) for _ in range(200)} == {1, 3}
    # Probabilities 0.48 (3.0), 0.43 (2.9), 0.06, 0.02: top_p 0.4 keeps the first alone, 0.8 both.
    assert {next_token(logits, SamplingOptions(top_p=0.4), g) for _ in range(50)} == {1}
    assert {next_token(logits, SamplingOptions(top_p=0.8), g) for _ in range(200)} == {1, 3}
    for bad, field in ((dict(temperature=-1), "--temperature"), (dict(top_p=0), "--top-p"),
                       (dict(top_k=-1), "--top-k"), (dict(max_new_tokens=0), "--max-new-tokens")):
        with pytest.raises(ConfigError, match=field):
            SamplingOptions(**bad).validate()


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "SOURCE" in capsys.readouterr().err
    assert main(["generate", str(tmp_path)]) == 2
    assert "--prompt" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["generate", str(tmp_path), "--prompt-file", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompt" in capsys.readouterr().err
