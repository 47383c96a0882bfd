"""Shared fixtures: a small English corpus (the embedded sample), a tokenizer and a dataset, made once."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TrainData:
    """Where a multi-process test's runs find the session's tokenizer and dataset, and put their
    run directories: handed to its cases as an argument (tests/dist.py)."""

    tokenizer: str
    dataset: str
    runs: str

    def overrides(self) -> list[str]:
        return [f"data.tokenizer={self.tokenizer}", f"data.paths=[{self.dataset}]", f"run.root={self.runs}"]


def train_data(tokenizer_dir: Path, dataset: str, tmp_path_factory: pytest.TempPathFactory, name: str) -> TrainData:
    return TrainData(str(tokenizer_dir), dataset, str(tmp_path_factory.mktemp(name)))


QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
TINY_RUN = ["model.num_layers=1", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=32",
            "train.global_batch_size=4", "train.micro_batch_size=2", "eval.interval=0", "tracking.enabled=false"]


def tiny_train_argv(tokenizer_dir: Path, dataset: str, run_dir: Path, *extra: str) -> list[str]:
    """`mlra-mega train` of a 1-layer model on the session data into `run_dir` (in-process, seconds)."""
    return ["train", str(QUICKSTART), *TINY_RUN, f"data.tokenizer={tokenizer_dir}", f"data.paths=[{dataset}]",
            f"run.dir={run_dir}", f"run.root={run_dir.parent}", *extra]


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, sample_dataset: str) -> Path:
    """A 4-step run stopped after step 3, a checkpoint at each step (ZeRO-1: every kind of file).
    Tests copy it before they change anything."""
    from mlra_mega.cli import main

    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    argv = tiny_train_argv(tokenizer_dir, sample_dataset, run_dir, "train.steps=4", "train.stop_at=3",
                           "checkpoint.interval=1", "checkpoint.keep=3", "zero.stage=1")
    assert main(argv) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == [
        "step00000001", "step00000002", "step00000003"]
    return run_dir


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001 - pytest hook
    import sys

    module = sys.modules.get("tests.test_bad_input")
    if module is not None:
        terminalreporter.write_line(f"bad-input suite: {module.pytest_bad_input_count()} bad inputs covered "
                                    f"({len(module.BAD_INPUTS)} table rows + {len(module.EXTRA_CASES)} tests)")


@pytest.fixture(scope="session")
def elastic_straight(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, sample_dataset: str) -> Path:
    """8 uninterrupted steps at TP=2 x DP=2 ZeRO-1, dropout 0, saving asynchronously at 4 and 8,
    under torchrun on this host: the reference of the elastic resumes and of the two-node jobs."""
    from tests.train.test_checkpoint import overrides
    from tests.train.test_elastic import COMMON, torchrun

    straight = tmp_path_factory.mktemp("elastic-straight") / "run"
    torchrun(4, overrides(tokenizer_dir, sample_dataset, straight, *COMMON, "parallel.tensor=2", "checkpoint.async=true"))
    return straight


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, sample_dataset: str) -> Path:
    """4 in-process steps of a llama-block MLRA model with grouped-query attention (2 key/value
    heads for 4 query heads), untied, checkpointed at step 4: what generate and evaluate read."""
    from mlra_mega.config import load_config
    from mlra_mega.train.run import train
    from tests.train.test_checkpoint import overrides

    run = tmp_path_factory.mktemp("llama") / "run"
    train(load_config(None, overrides(tokenizer_dir, sample_dataset, run, "model.arch=llama", "model.num_kv_heads=2",
                                      "tracking.enabled=false", "train.steps=4", "checkpoint.interval=4",
                                      "optim.lr=3e-3")), log=lambda s: None)
    return run
