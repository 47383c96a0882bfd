"""The quickstart: the whole pipeline on the embedded sample corpus, small enough for 2 CPU cores.

Sample corpus (stdlib docstrings) -> sentencepiece tokenizer -> indexed dataset -> a tiny MLRA
GPT trained from `configs/quickstart.yaml`. Tokenizer and dataset are made once under
`<run.root>/quickstart-data/` and reused while they still match each other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlra_mega.config import ConfigError, RunConfig, load_config

__all__ = ["QUICKSTART_CONFIG", "prepare_sample_data", "quickstart_config"]

QUICKSTART_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
SAMPLE_VOCAB = 2048


def prepare_sample_data(root: Path, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(tokenizer dir, dataset prefix) of the sample corpus under `root`, made if missing."""
    from mlra_mega.data.datasets import check_dataset_cards
    from mlra_mega.data.preprocess import Progress, preprocess
    from mlra_mega.data.sample import sample_corpus
    from mlra_mega.data.tokenizer import load_tokenizer, train_tokenizer
    from mlra_mega.errors import DataError

    tok_dir, prefix = root / "tokenizer", root / "sample"
    corpus = sample_corpus()
    try:
        tokenizer = load_tokenizer(tok_dir)
    except DataError:
        train_tokenizer([corpus], SAMPLE_VOCAB, tok_dir, log=log)
        tokenizer = load_tokenizer(tok_dir)
    try:
        check_dataset_cards([str(prefix)], tokenizer)
    except DataError:
        summary = preprocess([corpus], tok_dir, prefix, overwrite=True,
                             progress=Progress(None, interactive=False, log=log))
        log(summary.line())
    return tok_dir, prefix


def quickstart_config(overrides: list[str], log: Callable[[str], None] = print) -> RunConfig:
    """configs/quickstart.yaml with the sample data filled in, then the user's overrides."""
    if not QUICKSTART_CONFIG.is_file():
        raise ConfigError("quickstart", f"{QUICKSTART_CONFIG} not found",
                          "run from a source checkout (pip install -e .), where configs/ sits beside the package")
    root = Path(load_config(QUICKSTART_CONFIG, overrides).run.root)
    tok_dir, prefix = prepare_sample_data(root / "quickstart-data", log=log)
    return load_config(QUICKSTART_CONFIG, [f"data.tokenizer={tok_dir}", f"data.paths=[{prefix}]", *overrides])
