"""Train and load sentencepiece tokenizers, each with a JSON card.

Training feeds sentencepiece lines, never whole documents: it silently drops any sentence
longer than `max_sentence_length` bytes, so longer lines are cut at whitespace into pieces that
fit, and what still does not fit is dropped and counted. Over `max_training_bytes` of input,
lines are sampled with a seeded RNG. The same input, options and seed give the same model bytes.

Every tokenizer has byte fallback (no unknown characters) and an end-of-document token, the
sentencepiece `</s>` id, which preprocessing appends to each document. The card
(`card.json` beside `tokenizer.model`) records vocab size, special ids, the input hash and the
model file's hash, so datasets and checkpoints can name the tokenizer that made them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mlra_mega.data.documents import ReadOptions, ReadStats, iter_documents
from mlra_mega.errors import ConfigError, DataError
from mlra_mega.files import bytes_sha256, file_sha256

__all__ = ["TokenizerCard", "Tokenizer", "MegatronTokenizerAdapter", "train_tokenizer", "load_tokenizer",
           "MODEL_FILE", "CARD_FILE", "split_long_line", "check_vocab"]

MODEL_FILE = "tokenizer.model"
CARD_FILE = "card.json"


@dataclass(frozen=True)
class TokenizerCard:
    vocab_size: int
    model_type: str
    unk_id: int
    eod_id: int
    bos_id: int
    pad_id: int
    model_sha256: str
    input_sha256: str
    inputs: list[str]
    seed: int
    lines_used: int
    lines_split: int
    lines_dropped: int
    sampled: bool
    sentencepiece_version: str


_SPACE = re.compile(rb"\s+")


def split_long_line(line: str, max_bytes: int) -> tuple[list[str], int]:
    """Pieces of `line` of at most `max_bytes` UTF-8 bytes, cut at whitespace; (pieces, dropped)."""
    raw = line.encode("utf-8")
    if len(raw) <= max_bytes:
        return [line], 0
    pieces, dropped, current = [], 0, b""
    for word in _SPACE.split(raw):
        if not word:
            continue
        if len(word) > max_bytes:
            dropped += 1  # a single run without whitespace longer than the limit
            continue
        candidate = current + b" " + word if current else word
        if len(candidate) > max_bytes:
            pieces.append(current.decode("utf-8", errors="ignore"))
            current = word
        else:
            current = candidate
    if current:
        pieces.append(current.decode("utf-8", errors="ignore"))
    return pieces, dropped


@dataclass
class _LineStats:
    used: int = 0
    split: int = 0
    dropped: int = 0


def _lines(paths: list[Path], opts: ReadOptions) -> Iterator[str]:
    stats = ReadStats()
    for path in paths:
        for doc in iter_documents(path, opts, stats):
            for line in doc.splitlines():
                if line.strip():
                    yield line


def _input_digest(paths: list[Path]) -> tuple[str, int]:
    h = hashlib.sha256()
    total = 0
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: input file not found (fix: check the --input paths)")
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        total += path.stat().st_size
    return h.hexdigest(), total


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise DataError(f"cannot write the tokenizer to {out}: {exc.strerror or exc} "
                        "(fix: choose a writable --output directory)") from None


def train_tokenizer(inputs: list[str | Path], vocab_size: int, output_dir: str | Path, *,
                    model_type: Literal["bpe", "unigram"] = "bpe", seed: int = 0,
                    max_training_bytes: int = 200_000_000, max_sentence_length: int = 4192,
                    json_key: str = "text", threads: int | None = None,
                    log: Callable[[str], None] = print) -> TokenizerCard:
    """Trains a sentencepiece model on `inputs` and writes it with its card to `output_dir`."""
    import sentencepiece as spm

    paths = [Path(p) for p in inputs]
    if vocab_size < 16:
        raise ConfigError("--vocab-size", f"{vocab_size} is too small", "use at least a few hundred")
    if model_type not in ("bpe", "unigram"):
        raise ConfigError("--model-type", f"{model_type!r} is not bpe or unigram", "use bpe or unigram")
    _check_writable(Path(output_dir))  # before training, which can take hours
    digest, total = _input_digest(paths)
    keep_p = min(1.0, max_training_bytes / total) if total else 1.0
    rng = random.Random(seed)
    stats = _LineStats()
    opts = ReadOptions(json_key=json_key)

    read_errors: list[DataError] = []

    def sentences() -> Iterator[str]:
        try:
            yield from pieces()
        except DataError as exc:  # raised inside sentencepiece's trainer, which would hide it
            read_errors.append(exc)

    def pieces() -> Iterator[str]:
        for line in _lines(paths, opts):
            if keep_p < 1.0 and rng.random() >= keep_p:
                continue
            pieces, dropped = split_long_line(line, max_sentence_length)
            stats.dropped += dropped
            stats.split += len(pieces) > 1
            stats.used += len(pieces)
            yield from pieces

    log(f"[tokenizer] training {model_type}, vocab {vocab_size}, on {total / 1e6:.1f} MB"
        + (f" (sampling {keep_p:.1%} of lines, seed {seed})" if keep_p < 1 else ""))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, eos_piece="</s>",
            max_sentence_length=max_sentence_length, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=threads or 1, split_digits=True, hard_vocab_limit=True, minloglevel=2)
    except RuntimeError as exc:
        if read_errors:
            raise read_errors[0] from None
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        fix = "raise --vocab-size" if "smaller than required_chars" in msg else "lower --vocab-size or give more text"
        raise DataError(f"sentencepiece could not train on these inputs: {msg} (fix: {fix})") from None
    if read_errors:
        raise read_errors[0]
    if stats.used == 0:
        raise DataError("the inputs hold no text lines to train on (fix: check the --input files)")

    out = Path(output_dir)
    tmp_model, tmp_card = out / (MODEL_FILE + ".tmp"), out / (CARD_FILE + ".tmp")
    try:
        return _write_tokenizer(out, tmp_model, tmp_card, model.getvalue(), model_type, digest, paths, seed, stats,
                                keep_p, log)
    except OSError as exc:
        for tmp in (tmp_model, tmp_card):
            try:
                tmp.unlink()
            except OSError:
                pass  # never written, or the place refuses writes: the first error is the one to report
        raise DataError(f"cannot write the tokenizer to {out}: {exc.strerror or exc} "
                        "(fix: choose a writable --output directory)") from None


def _write_tokenizer(out: Path, tmp_model: Path, tmp_card: Path, proto: bytes, model_type: str, digest: str,
                     paths: list[Path], seed: int, stats: _LineStats, keep_p: float,
                     log: Callable[[str], None]) -> TokenizerCard:
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    tmp_model.write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    card = TokenizerCard(
        vocab_size=sp.vocab_size(), model_type=model_type, unk_id=sp.unk_id(), eod_id=sp.eos_id(),
        bos_id=sp.bos_id(), pad_id=sp.pad_id(), model_sha256=bytes_sha256(proto),
        input_sha256=digest, inputs=[str(p) for p in paths], seed=seed, lines_used=stats.used,
        lines_split=stats.split, lines_dropped=stats.dropped, sampled=keep_p < 1.0,
        sentencepiece_version=spm.__version__)
    tmp_card.write_text(json.dumps(asdict(card), indent=2) + "\n")
    os.replace(tmp_model, out / MODEL_FILE)
    os.replace(tmp_card, out / CARD_FILE)
    log(f"[tokenizer] wrote {out / MODEL_FILE}: vocab {card.vocab_size}, end-of-document id {card.eod_id}, "
        f"{stats.used} lines ({stats.split} long lines cut, {stats.dropped} over-long pieces dropped)")
    return card


class Tokenizer:
    """A loaded sentencepiece model and its card."""

    def __init__(self, model_path: Path, card: TokenizerCard) -> None:
        import sentencepiece as spm

        self.model_path = model_path
        self.card = card
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))

    @property
    def vocab_size(self) -> int:
        return self.card.vocab_size

    @property
    def eod(self) -> int:
        return self.card.eod_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)

    def encode_documents(self, texts: list[str], dtype: type = np.int32) -> tuple[np.ndarray, np.ndarray]:
        """(all tokens with an end-of-document after each document, per-document lengths)."""
        ids = self.sp.encode(texts, num_threads=1)
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        flat = np.empty(int(lengths.sum()), dtype=dtype)
        pos = 0
        for doc in ids:
            n = len(doc)
            flat[pos:pos + n] = doc
            flat[pos + n] = self.eod
            pos += n + 1
        return flat, lengths

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def megatron(self) -> MegatronTokenizerAdapter:
        """The adapter megatron-core's GPTDataset expects (vocab size, eod, pad)."""
        return MegatronTokenizerAdapter(self)


class MegatronTokenizerAdapter:
    """What megatron-core's GPTDataset reads of a tokenizer: vocab size, eod and an identity."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.eos = tokenizer.eod
        # Part of megatron's index-cache key: a different tokenizer never reuses a cache.
        self.unique_identifiers = {"class": "mlra_mega.sentencepiece", "model_sha256": tokenizer.card.model_sha256}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer directory (or its tokenizer.model) with its card."""
    p = Path(path)
    directory = p.parent if p.suffix == ".model" else p
    model, card_path = directory / MODEL_FILE, directory / CARD_FILE
    if not model.is_file() or not card_path.is_file():
        raise DataError(f"{directory}: no tokenizer here (expected {MODEL_FILE} and {CARD_FILE}) "
                        "(fix: train one with `mlra-mega tokenizer train`)")
    try:
        card = TokenizerCard(**json.loads(card_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"{card_path}: not a tokenizer card ({exc}) (fix: retrain the tokenizer)") from None
    if file_sha256(model) != card.model_sha256:
        raise DataError(f"{model}: does not match its card (sha256 differs) "
                        "(fix: keep tokenizer.model and card.json together, or retrain)")
    return Tokenizer(model, card)


def check_vocab(model_vocab: int | None, tokenizer: Tokenizer) -> int:
    """The model's vocabulary size, defaulting to the tokenizer's; a mismatch is refused."""
    if model_vocab is None:
        return tokenizer.vocab_size
    if model_vocab != tokenizer.vocab_size:
        raise ConfigError("model.vocab_size",
                          f"{model_vocab} differs from the tokenizer's vocabulary {tokenizer.vocab_size} "
                          f"({tokenizer.model_path})",
                          f"set model.vocab_size={tokenizer.vocab_size} or leave it null to take the tokenizer's")
    return model_vocab
