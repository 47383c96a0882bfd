"""`model.init_from`: a GPT-2 directory saved by transformers (random weights made here) starts a
run, and `export-hf` of its first checkpoint gives the same weights back; an MLRA model starts from
each head's truncated SVD, exact at r = d_head, with the reported error that of the discarded
singular values; a mismatched vocabulary, a pickle-only directory and a wrong shape are one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mlra_mega.cli import main
from mlra_mega.config import load_config
from tests.train.test_checkpoint import overrides

transformers = pytest.importorskip("transformers")

VOCAB = 600  # the test tokenizer's
# optim.lr=1e-30: the one step changes no weight, so the checkpoint holds the imported weights.
RUN = ["model.seq_length=32", "train.steps=1", "checkpoint.interval=1", "optim.lr=1e-30", "tracking.enabled=false"]


def gpt2_dir(path: Path, vocab: int = VOCAB, n_positions: int = 32, seed: int = 0, **extra) -> Path:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
                                     activation_function="gelu_new", **extra)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # well away from the init: every tensor, biases and norms included, is non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return path


def safetensors_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("attention", ["mha", "mlra"])
def test_init_from_then_export_gives_the_weights_back(attention: str, tmp_path: Path, tokenizer_dir: Path,
                                                      sample_dataset: str) -> None:
    from mlra_mega.export import export_hf
    from mlra_mega.train.run import train

    src = gpt2_dir(tmp_path / "gpt2")
    run, lines = tmp_path / "run", []
    train(load_config(None, overrides(tokenizer_dir, sample_dataset, run, *RUN, f"model.attention={attention}",
                                      f"model.init_from={src}")), log=lines.append)
    assert any(line.startswith(f"[init] weights from {src}") for line in lines), lines
    if attention == "mlra":
        svd = [line for line in lines if "truncated SVD" in line]
        assert svd and float(svd[0].rsplit("(max ", 1)[1].rstrip(")")) < 1e-6, svd
    back = safetensors_of(export_hf(run, tmp_path / "hf", log=lambda s: None))
    original = safetensors_of(src)
    for name, want in original.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers, not weights
        key = name if name in back else f"transformer.{name}"
        got = back[key][:want.shape[0]] if "wte" in name else back[key]
        tol = 1e-5 if attention == "mlra" else 1e-6  # MLRA: composed back from the SVD factors
        assert torch.allclose(got, want, atol=tol, rtol=0), (name, (got - want).abs().max().item())


def llama_dir(path: Path, vocab: int = VOCAB, kv: int = 2, seed: int = 0, **extra) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, **extra)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # norms included: every tensor is non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("attention", ["mha", "mlra"])
def test_init_from_a_llama_directory_then_export_gives_the_weights_back(
        attention: str, tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    from mlra_mega.export import export_hf
    from mlra_mega.train.run import train

    src = llama_dir(tmp_path / "llama")
    run, lines = tmp_path / "run", []
    train(load_config(None, overrides(tokenizer_dir, sample_dataset, run, *RUN, "model.arch=llama",
                                      "model.num_kv_heads=2", f"model.attention={attention}",
                                      f"model.init_from={src}")), log=lines.append)
    assert any(line.startswith(f"[init] weights from {src} (Hugging Face Llama)") for line in lines), lines
    if attention == "mlra":  # r = d_head: every head's SVD (k and v per key/value head) is exact
        svd = [line for line in lines if "truncated SVD" in line]
        assert svd and float(svd[0].rsplit("(max ", 1)[1].rstrip(")")) < 1e-6, svd
    back = safetensors_of(export_hf(run, tmp_path / "hf", log=lambda s: None))
    original = safetensors_of(src)
    assert set(original) <= set(back)
    for name, want in original.items():
        got = back[name][:want.shape[0]] if "embed_tokens" in name or "lm_head" in name else back[name]
        tol = 1e-5 if attention == "mlra" else 1e-6
        assert torch.allclose(got, want, atol=tol, rtol=0), (name, (got - want).abs().max().item())


def test_the_svd_error_is_that_of_the_discarded_singular_values(tmp_path: Path) -> None:
    from mlra_mega.model.hf_import import init_from_hf
    from tests.model.helpers import tiny_cfg

    src = gpt2_dir(tmp_path / "gpt2", vocab=VOCAB, n_positions=32)
    cfg = tiny_cfg(attention="mlra", rank=5, vocab_size=VOCAB)
    _, errors = init_from_hf(src, cfg)
    t = {k.removeprefix("transformer."): v for k, v in safetensors_of(src).items()}
    for layer, err in enumerate(errors):
        w = t[f"h.{layer}.attn.c_attn.weight"].double()  # [d, 3d]: all q, all k, all v
        lost = total = 0.0
        for block in w.split(64, dim=1):
            for head in block.split(16, dim=1):
                s = torch.linalg.svdvals(head)
                lost, total = lost + float((s[5:] ** 2).sum()), total + float((s ** 2).sum())
        assert err == pytest.approx(math.sqrt(lost / total), rel=1e-6)
        assert 0.1 < err < 1


def test_what_does_not_fit_is_one_line(tmp_path: Path, tokenizer_dir: Path, sample_dataset: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    def refused(src: Path, *extra: str) -> str:
        run = tmp_path / f"run-{src.name}"
        argv = ["train", "configs/quickstart.yaml", *overrides(tokenizer_dir, sample_dataset, run, *RUN,
                                                                f"model.init_from={src}", *extra)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    assert "vocabulary is 500, ours is 600" in refused(gpt2_dir(tmp_path / "v500", vocab=500))
    assert "set model.arch=llama" in refused(llama_dir(tmp_path / "llama"))
    assert "set model.num_kv_heads=1" in refused(llama_dir(tmp_path / "mqa", kv=1), "model.arch=llama",
                                                 "model.num_kv_heads=2")
    assert "set model.rotary_base=500000.0" in refused(llama_dir(tmp_path / "theta", rope_theta=500000.0),
                                                       "model.arch=llama", "model.num_kv_heads=2")
    assert "model.hidden_size" in refused(gpt2_dir(tmp_path / "narrow"), "model.hidden_size=32",
                                          "model.num_heads=2")
    assert "model.tie_embeddings" in refused(gpt2_dir(tmp_path / "untied", tie_word_embeddings=False))
    pickled = tmp_path / "pickled"
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    config.save_pretrained(pickled)
    torch.save(transformers.GPT2LMHeadModel(config).state_dict(), pickled / "pytorch_model.bin")
    assert "no safetensors weights (only pytorch_model.bin, a pickle)" in refused(pickled)
    nowhere = refused(tmp_path / "nowhere")
    assert "model.init_from: " in nowhere and "no config.json" in nowhere
    # A checkpoint's saved config names the directory it started from: reading it later needs no such directory.
    load_config(None, [f"model.init_from={tmp_path / 'nowhere'}"]).validate()
