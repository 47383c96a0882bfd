"""Reading raw corpora as documents: plain text or JSON Lines, optionally gzip, bad input counted.

- `.jsonl` / `.json` (optionally `.gz`): one JSON object per line, the text under `json_key`.
- anything else: plain text; a document per line (`line`) or per blank-line-separated block
  (`blank-line`).
Invalid UTF-8 is replaced (U+FFFD) or the document skipped; empty documents are skipped; a
malformed JSON line or a missing key is a `DataError` naming file and line, unless skipped.
Every skip and replacement is counted in `ReadStats`.
"""

from __future__ import annotations

import gzip
import zlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from mlra_mega.errors import DataError

__all__ = ["ReadOptions", "ReadStats", "iter_documents", "is_jsonl", "input_bytes"]

DocBoundary = Literal["line", "blank-line"]


@dataclass(frozen=True)
class ReadOptions:
    json_key: str = "text"
    doc_boundary: DocBoundary = "line"
    invalid_utf8: Literal["replace", "skip"] = "replace"
    skip_bad_json: bool = False


@dataclass
class ReadStats:
    documents: int = 0
    bytes_read: int = 0
    skipped: Counter = field(default_factory=Counter)   # reason -> documents
    replaced_utf8: int = 0                              # documents kept with U+FFFD

    def merge(self, other: "ReadStats") -> None:
        self.documents += other.documents
        self.bytes_read += other.bytes_read
        self.skipped.update(other.skipped)
        self.replaced_utf8 += other.replaced_utf8


def is_jsonl(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in (".jsonl", ".json")


def input_bytes(paths: list[Path]) -> int | None:
    """Uncompressed size of the inputs, or None when some are gzip (not known up front)."""
    if any(p.suffix.lower() == ".gz" for p in paths):
        return None
    return sum(p.stat().st_size for p in paths)


def _open(path: Path) -> BinaryIO:
    if not path.is_file():
        raise DataError(f"{path}: input file not found (fix: check the --input paths)")
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _decode(raw: bytes, opts: ReadOptions, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if opts.invalid_utf8 == "skip":
            stats.skipped["invalid_utf8"] += 1
            return None
        stats.replaced_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _keep(text: str, stats: ReadStats) -> bool:
    if not text.strip():
        stats.skipped["empty"] += 1
        return False
    stats.documents += 1
    return True


def _raw_text_documents(f: BinaryIO, boundary: DocBoundary, stats: ReadStats) -> Iterator[bytes]:
    if boundary == "line":
        for line in f:
            stats.bytes_read += len(line)
            yield line.rstrip(b"\r\n")
        return
    block: list[bytes] = []
    for line in f:
        stats.bytes_read += len(line)
        if line.strip():
            block.append(line.rstrip(b"\r\n"))
        elif block:
            yield b"\n".join(block)
            block = []
    if block:
        yield b"\n".join(block)


def iter_documents(path: Path, opts: ReadOptions, stats: ReadStats) -> Iterator[str]:
    """Yields the documents of one file, counting skips into `stats`; a file that cannot be read
    to its end (a gzip cut short or not gzip at all, a read error) is a DataError naming it."""
    try:
        yield from _documents(path, opts, stats)
    except (EOFError, zlib.error) as exc:
        raise DataError(f"{path}: the compressed file is cut short or damaged ({exc}) "
                        "(fix: download or compress it again)") from None
    except gzip.BadGzipFile as exc:
        raise DataError(f"{path}: not a gzip file ({exc}) (fix: name it without .gz if it is plain text, "
                        "or compress it with gzip)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}) (fix: check the --input file)") from None


def _documents(path: Path, opts: ReadOptions, stats: ReadStats) -> Iterator[str]:
    with _open(path) as f:
        if not is_jsonl(path):
            for raw in _raw_text_documents(f, opts.doc_boundary, stats):
                text = _decode(raw, opts, stats)
                if text is not None and _keep(text, stats):
                    yield text
            return
        for lineno, raw in enumerate(f, start=1):
            stats.bytes_read += len(raw)
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw)  # decodes UTF-8 itself: one pass for valid lines
                except UnicodeDecodeError:
                    line = _decode(raw, opts, stats)
                    if line is None:
                        continue
                    obj = json.loads(line)
            except json.JSONDecodeError as exc:
                if opts.skip_bad_json:
                    stats.skipped["bad_json"] += 1
                    continue
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}) "
                                "(fix: repair the line, or pass --skip-bad-json to skip and count it)") from None
            if not isinstance(obj, dict) or opts.json_key not in obj:
                if opts.skip_bad_json:
                    stats.skipped["missing_key"] += 1
                    continue
                raise DataError(f"{path}:{lineno}: no {opts.json_key!r} key in this JSON line "
                                "(fix: pass --json-key with the right key, or --skip-bad-json)")
            text = obj[opts.json_key]
            if not isinstance(text, str):
                if opts.skip_bad_json:
                    stats.skipped["missing_key"] += 1
                    continue
                raise DataError(f"{path}:{lineno}: {opts.json_key!r} holds {type(text).__name__}, not text "
                                "(fix: pass --json-key naming a text field, or --skip-bad-json)")
            if _keep(text, stats):
                yield text
