"""Tokenizers made elsewhere: a GPT-2 byte-level BPE `tokenizer.json` built here with the tokenizers
library goes through preprocess (one end-of-document id per document, the rest a direct encode),
train, export-hf and generate from the export; a sentencepiece model without our card loads with a
computed card; a tokenizer with no end-of-document token asks for one in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlra_mega.data.preprocess import Progress, preprocess
from mlra_mega.data.tokenizer import MODEL_FILE, load_tokenizer
from mlra_mega.errors import DataError
from tests.train.test_checkpoint import overrides

tokenizers = pytest.importorskip("tokenizers")


def quiet() -> Progress:
    return Progress(None, interactive=False, interval_s=1e9, log=lambda s: None)


def gpt2_bpe(path: Path, docs: list[str], special: str | None = "<|endoftext|>") -> Path:
    """A GPT-2 style byte-level BPE tokenizer.json trained on `docs`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=[special] if special else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_a_gpt2_tokenizer_json_goes_through_preprocess_train_export_and_generate(
        tmp_path: Path, corpus_docs: list[str], corpus_jsonl: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mlra_mega.export import export_hf
    from mlra_mega.config import load_config
    from mlra_mega.generate import SamplingOptions, generate, load_source
    from mlra_mega.train.run import train
    from tests.test_generate import one_process

    tok_json = gpt2_bpe(tmp_path / "gpt2tok" / "tokenizer.json", corpus_docs)
    tok = load_tokenizer(tok_json)
    eod = tokenizers.Tokenizer.from_file(str(tok_json)).token_to_id("<|endoftext|>")
    assert tok.kind == "hf" and tok.eod == eod and tok.vocab_size == 500
    summary = preprocess([corpus_jsonl], tok_json, tmp_path / "ds", progress=quiet())
    direct = tokenizers.Tokenizer.from_file(str(tok_json)).encode_batch(corpus_docs, add_special_tokens=False)
    assert summary.tokens == sum(len(e.ids) + 1 for e in direct) and summary.documents == len(corpus_docs)
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert ds[5].tolist() == direct[5].ids + [eod]
    assert int(np.sum(ds.sequence_lengths)) == summary.tokens

    run = tmp_path / "run"
    train(load_config(None, overrides(tmp_path / "gpt2tok", str(tmp_path / "ds"), run, "model.attention=mha",
                                      "train.steps=2", "checkpoint.interval=2", "tracking.enabled=false")),
          log=lambda s: None)
    assert json.loads((run / "checkpoints" / "step00000002" / "tokenizer" / "card.json").read_text())["eod_id"] == eod
    hf = export_hf(run, tmp_path / "hf", log=lambda s: None)
    from transformers import AutoTokenizer

    text = "Return the number of items."
    assert AutoTokenizer.from_pretrained(hf).encode(text, add_special_tokens=False) == tok.encode_one(text)
    greedy = SamplingOptions(max_new_tokens=6, temperature=0)
    with one_process():
        ours, theirs = load_source(run), load_source(hf)
        assert theirs.eod == ours.eod == eod
        ours.eod = theirs.eod = -1  # an untrained model may emit it first
        assert generate(ours, text, greedy) == generate(theirs, text, greedy)


def test_a_sentencepiece_model_without_our_card_and_a_tokenizer_without_an_eod(tmp_path: Path, tokenizer_dir: Path,
                                                                              corpus_docs: list[str]) -> None:
    ours = load_tokenizer(tokenizer_dir)
    bare = tmp_path / "elsewhere" / "spm.model"
    bare.parent.mkdir()
    shutil.copy(tokenizer_dir / MODEL_FILE, bare)
    theirs = load_tokenizer(bare)
    assert theirs.kind == "sentencepiece" and theirs.eod == ours.eod and theirs.vocab_size == ours.vocab_size
    assert theirs.card.model_sha256 == ours.card.model_sha256
    assert theirs.encode(corpus_docs[:20]) == ours.encode(corpus_docs[:20])
    no_eod = gpt2_bpe(tmp_path / "noeod" / "tokenizer.json", corpus_docs[:200], special=None)
    with pytest.raises(DataError, match=r"no end-of-document token \(none of <\|endoftext\|>.*data.eod_id, or --eod-id"):
        load_tokenizer(no_eod)
    assert load_tokenizer(no_eod, eod_id=3).eod == 3
    with pytest.raises(DataError, match="end-of-document id 900 is outside its vocabulary"):
        load_tokenizer(no_eod, eod_id=900)
    with pytest.raises(DataError, match="its card's end-of-document id is"):
        load_tokenizer(tokenizer_dir, eod_id=ours.eod + 1)
