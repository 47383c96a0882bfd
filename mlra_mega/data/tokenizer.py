"""Train and load sentencepiece tokenizers, each with a JSON card; load tokenizers made elsewhere.

Training feeds sentencepiece lines, never whole documents: it silently drops any sentence
longer than `max_sentence_length` bytes, so longer lines are cut at whitespace into pieces that
fit, and what still does not fit is dropped and counted. Over `max_training_bytes` of input,
lines are sampled with a seeded RNG. The same input, options and seed give the same model bytes.

Every tokenizer has byte fallback (no unknown characters) and an end-of-document token, the
sentencepiece `</s>` id, which preprocessing appends to each document. The card
(`card.json` beside `tokenizer.model`) records vocab size, special ids, the input hash and the
model file's hash, so datasets and checkpoints can name the tokenizer that made them.

A tokenizer made elsewhere, a sentencepiece model without our card or a Hugging Face
`tokenizer.json`, gets its card computed on load (vocabulary, special ids, hash); its
end-of-document id is the tokenizer's own (sentencepiece's eos, or the first of `EOD_TOKENS` it
has) or given (`data.eod_id`, `--eod-id`). Checkpoints keep a copy with the card (`write_dir`).
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
           "MODEL_FILE", "HF_FILE", "CARD_FILE", "split_long_line", "check_vocab"]

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


HF_FILE = "tokenizer.json"
# Tried in order for a tokenizer without our card: the first one it has is its end of document.
EOD_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class Tokenizer:
    """A loaded tokenizer and its card: our sentencepiece model, a sentencepiece model from
    elsewhere (card computed on load), or a Hugging Face `tokenizer.json` (fast tokenizers, GPT-2
    byte-level BPE included)."""

    def __init__(self, model_path: Path, card: TokenizerCard) -> None:
        self.model_path = model_path
        self.card = card
        self.kind = "hf" if model_path.name.endswith(".json") else "sentencepiece"
        if self.kind == "hf":
            from tokenizers import Tokenizer as FastTokenizer

            self.hf = FastTokenizer.from_file(str(model_path))
        else:
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=str(model_path))

    @property
    def vocab_size(self) -> int:
        return self.card.vocab_size

    @property
    def eod(self) -> int:
        return self.card.eod_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "hf":
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return self.sp.encode(texts, num_threads=1)

    def encode_one(self, text: str) -> list[int]:
        return self.encode([text])[0]

    def encode_documents(self, texts: list[str], dtype: type = np.int32) -> tuple[np.ndarray, np.ndarray]:
        """(all tokens with an end-of-document after each document, per-document lengths)."""
        ids = self.encode(texts)
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
        if self.kind == "hf":
            return self.hf.decode(ids, skip_special_tokens=False)
        return self.sp.decode(ids)

    def megatron(self) -> MegatronTokenizerAdapter:
        """The adapter megatron-core's GPTDataset expects (vocab size, eod, pad)."""
        return MegatronTokenizerAdapter(self)

    def write_dir(self, out: Path) -> Path:
        """This tokenizer as a directory of ours (its model file and its card), e.g. for checkpoints."""
        out.mkdir(parents=True, exist_ok=True)
        name = HF_FILE if self.kind == "hf" else MODEL_FILE
        tmp = out / (name + f".tmp-{os.getpid()}")
        tmp.write_bytes(self.model_path.read_bytes())
        os.replace(tmp, out / name)
        card_tmp = out / (CARD_FILE + f".tmp-{os.getpid()}")
        card_tmp.write_text(json.dumps(asdict(self.card), indent=2) + "\n")
        os.replace(card_tmp, out / CARD_FILE)
        return out


class MegatronTokenizerAdapter:
    """What megatron-core's GPTDataset reads of a tokenizer: vocab size, eod and an identity."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.eos = tokenizer.eod
        # Part of megatron's index-cache key: a different tokenizer never reuses a cache.
        self.unique_identifiers = {"class": f"mlra_mega.{tokenizer.kind}", "model_sha256": tokenizer.card.model_sha256}


def _model_file(p: Path) -> Path | None:
    if p.is_file():
        return p
    for name in (MODEL_FILE, HF_FILE):
        if (p / name).is_file():
            return p / name
    return None


def _computed_card(model: Path, eod_id: int | None) -> TokenizerCard:
    """The card of a tokenizer made elsewhere, from the model itself."""
    fix = "give its end-of-document id (data.eod_id, or --eod-id for preprocess)"
    if model.name.endswith(".json"):
        try:
            from tokenizers import Tokenizer as FastTokenizer

            tok = FastTokenizer.from_file(str(model))
        except Exception as exc:  # the tokenizers library raises its own error type for a bad file
            raise DataError(f"{model}: not a Hugging Face tokenizer.json ({str(exc).splitlines()[0][:200]}) "
                            "(fix: give the tokenizer.json a tokenizers / transformers save wrote)") from None
        vocab, model_type = tok.get_vocab_size(with_added_tokens=True), "hf"
        found = next((t for t in EOD_TOKENS if tok.token_to_id(t) is not None), None)
        eod = eod_id if eod_id is not None else (tok.token_to_id(found) if found else None)
        unk = bos = pad = -1
        what = f"none of {', '.join(EOD_TOKENS)} is in its vocabulary"
    else:
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(model))
        except (RuntimeError, OSError) as exc:
            raise DataError(f"{model}: not a sentencepiece model ({str(exc).splitlines()[0][:200]}) "
                            "(fix: give a tokenizer.model that sentencepiece wrote)") from None
        vocab, model_type = sp.get_piece_size(), "sentencepiece"
        eod = eod_id if eod_id is not None else (sp.eos_id() if sp.eos_id() >= 0 else None)
        unk, bos, pad = sp.unk_id(), sp.bos_id(), sp.pad_id()
        what = "it has no </s> (eos) piece"
    if eod is None:
        raise DataError(f"{model}: no end-of-document token ({what}) (fix: {fix})")
    if not 0 <= eod < vocab:
        raise DataError(f"{model}: end-of-document id {eod} is outside its vocabulary of {vocab} (fix: {fix})")
    return TokenizerCard(vocab_size=vocab, model_type=model_type, unk_id=unk, eod_id=eod, bos_id=bos, pad_id=pad,
                         model_sha256=file_sha256(model), input_sha256="", inputs=[], seed=0, lines_used=0,
                         lines_split=0, lines_dropped=0, sampled=False, sentencepiece_version="")


def load_tokenizer(path: str | Path, eod_id: int | None = None) -> Tokenizer:
    """A tokenizer: a directory of ours (tokenizer.model + card.json), a sentencepiece model or a
    Hugging Face tokenizer.json (a file, or a directory holding one) whose card is computed here;
    `eod_id` names the end-of-document id where the tokenizer has none of its own."""
    p = Path(path)
    model = _model_file(p)
    if model is None:
        raise DataError(f"{p}: no tokenizer here (expected {MODEL_FILE} with its {CARD_FILE}, a sentencepiece "
                        f".model, or a Hugging Face {HF_FILE}) (fix: train one with `mlra-mega tokenizer train`, "
                        "or give the tokenizer's file)")
    card_path = model.parent / CARD_FILE
    if not card_path.is_file() or model.name not in (MODEL_FILE, HF_FILE):
        return Tokenizer(model, _computed_card(model, eod_id))
    try:
        card = TokenizerCard(**json.loads(card_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"{card_path}: not a tokenizer card ({exc}) (fix: retrain the tokenizer)") from None
    if file_sha256(model) != card.model_sha256:
        raise DataError(f"{model}: does not match its card (sha256 differs) "
                        "(fix: keep tokenizer.model and card.json together, or retrain)")
    if eod_id is not None and eod_id != card.eod_id:
        raise DataError(f"{model}: its card's end-of-document id is {card.eod_id}, not {eod_id} "
                        "(fix: leave data.eod_id / --eod-id unset for a tokenizer with a card)")
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
