"""Tokenizer training: determinism, the card, byte fallback, long lines, sampling, refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mlra_mega.config import ConfigError
from mlra_mega.data.tokenizer import (CARD_FILE, MODEL_FILE, check_vocab, load_tokenizer, split_long_line,
                                      train_tokenizer)
from mlra_mega.errors import DataError
from tests.conftest import VOCAB


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_same_input_and_seed_give_the_same_model(tmp_path: Path, corpus_jsonl: Path, model_type: str) -> None:
    a = train_tokenizer([corpus_jsonl], VOCAB, tmp_path / "a", model_type=model_type, log=quiet)
    b = train_tokenizer([corpus_jsonl], VOCAB, tmp_path / "b", model_type=model_type, log=quiet)
    assert (tmp_path / "a" / MODEL_FILE).read_bytes() == (tmp_path / "b" / MODEL_FILE).read_bytes()
    assert a == b


def test_card_and_special_tokens(tokenizer_dir: Path, corpus_jsonl: Path) -> None:
    card = json.loads((tokenizer_dir / CARD_FILE).read_text())
    tok = load_tokenizer(tokenizer_dir)
    assert card["vocab_size"] == VOCAB == tok.vocab_size
    assert card["eod_id"] == tok.eod == tok.sp.eos_id() and tok.sp.id_to_piece(tok.eod) == "</s>"
    assert card["model_sha256"] == hashlib.sha256((tokenizer_dir / MODEL_FILE).read_bytes()).hexdigest()
    h = hashlib.sha256(corpus_jsonl.name.encode() + b"\0" + corpus_jsonl.read_bytes()).hexdigest()
    assert card["input_sha256"] == h
    text = "snowman \u2603 and kanji \u6f22\u5b57, never seen in training"
    assert tok.decode(tok.encode([text])[0]) == text  # byte fallback: nothing becomes <unk>
    assert tok.sp.unk_id() not in tok.encode([text])[0]


def test_long_lines_are_cut_at_whitespace_and_overlong_runs_counted() -> None:
    line = " ".join(["word"] * 3000)  # 14999 bytes
    pieces, dropped = split_long_line(line, 4192)
    assert dropped == 0 and len(pieces) == 4 and all(len(p.encode()) <= 4192 for p in pieces)
    assert " ".join(pieces) == line
    pieces, dropped = split_long_line("x" * 5000 + " tail", 4192)
    assert pieces == ["tail"] and dropped == 1


def test_training_counts_what_it_cut_and_dropped(tmp_path: Path, corpus_jsonl: Path) -> None:
    extra = tmp_path / "long.txt"
    extra.write_text(" ".join(["alpha beta"] * 1000) + "\n" + "y" * 6000 + "\n")
    card = train_tokenizer([corpus_jsonl, extra], VOCAB, tmp_path / "t", log=quiet)
    assert card.lines_split == 1 and card.lines_dropped == 1


def test_sampling_above_the_bound_is_seeded(tmp_path: Path, corpus_jsonl: Path) -> None:
    full = train_tokenizer([corpus_jsonl], VOCAB, tmp_path / "full", log=quiet)
    bound = corpus_jsonl.stat().st_size // 2
    a = train_tokenizer([corpus_jsonl], VOCAB, tmp_path / "a", max_training_bytes=bound, seed=1, log=quiet)
    b = train_tokenizer([corpus_jsonl], VOCAB, tmp_path / "b", max_training_bytes=bound, seed=1, log=quiet)
    c = train_tokenizer([corpus_jsonl], VOCAB, tmp_path / "c", max_training_bytes=bound, seed=2, log=quiet)
    assert a.sampled and not full.sampled
    assert 0.35 * full.lines_used < a.lines_used < 0.65 * full.lines_used
    assert a == b and a.lines_used != c.lines_used


def test_refusals(tmp_path: Path, corpus_jsonl: Path, tokenizer_dir: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a few words only\n")
    with pytest.raises(DataError, match="lower --vocab-size"):
        train_tokenizer([tiny], 5000, tmp_path / "t", log=quiet)
    with pytest.raises(DataError, match="input file not found"):
        train_tokenizer([tmp_path / "missing.txt"], VOCAB, tmp_path / "t", log=quiet)
    with pytest.raises(DataError, match="no tokenizer here"):
        load_tokenizer(tmp_path)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / CARD_FILE).write_text((tokenizer_dir / CARD_FILE).read_text())
    (tampered / MODEL_FILE).write_bytes((tokenizer_dir / MODEL_FILE).read_bytes() + b"x")
    with pytest.raises(DataError, match="does not match its card"):
        load_tokenizer(tampered)


def test_model_vocab_defaults_to_the_tokenizer_and_a_mismatch_names_both(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    assert check_vocab(None, tok) == VOCAB
    assert check_vocab(VOCAB, tok) == VOCAB
    with pytest.raises(ConfigError, match=f"model.vocab_size: 1000 differs from the tokenizer's vocabulary {VOCAB}"):
        check_vocab(1000, tok)


def test_cli_trains(tmp_path: Path, corpus_jsonl: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlra_mega.cli import main

    assert main(["tokenizer", "train", "--input", str(corpus_jsonl), "--vocab-size", str(VOCAB),
                 "--output", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / MODEL_FILE).is_file()
    assert main(["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "100",
                 "--output", str(tmp_path / "x")]) == 2
    assert "input file not found" in capsys.readouterr().err
