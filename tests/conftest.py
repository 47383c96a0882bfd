"""Shared fixtures: a small English corpus (the embedded sample), a tokenizer and a dataset, made once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlra_mega.data.sample import sample_corpus

CORPUS_DOCS = 1500
VOCAB = 600


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    with sample_corpus().open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(CORPUS_DOCS), f)]


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory: pytest.TempPathFactory, corpus_docs: list[str]) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_jsonl: Path) -> Path:
    from mlra_mega.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus_jsonl], VOCAB, out, log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory: pytest.TempPathFactory, corpus_jsonl: Path, tokenizer_dir: Path) -> str:
    """Prefix of the corpus preprocessed with the session tokenizer."""
    from mlra_mega.data.preprocess import Progress, preprocess

    prefix = tmp_path_factory.mktemp("dataset") / "corpus"
    preprocess([corpus_jsonl], tokenizer_dir, prefix, progress=Progress(None, interactive=False, log=lambda s: None))
    return str(prefix)
