"""Reading raw corpora as documents: plain text or JSON Lines, optionally gzip, bad input counted.

- `.jsonl` / `.json` (optionally `.gz` or `.zst`): one JSON object per line, the text under `json_key`.
- `.parquet`: a row per document, the text in column `json_key` (read in record batches, pyarrow).
- a directory saved by Hugging Face `datasets` (`save_to_disk`: a Dataset, or a DatasetDict with
  one split): a row per document, the text in column `json_key`.
- anything else: plain text (optionally `.gz` or `.zst`); a document per line (`line`) or per
  blank-line-separated block (`blank-line`).
Invalid UTF-8 is replaced (U+FFFD) or the document skipped; empty documents are skipped; a
malformed JSON line or a missing key is a `DataError` naming file and line, unless skipped.
Every skip and replacement is counted in `ReadStats`.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from mlra_mega.errors import DataError

__all__ = ["ReadOptions", "ReadStats", "iter_documents", "is_input", "is_jsonl", "is_saved_dataset", "input_bytes"]

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


COMPRESSED = (".gz", ".zst")


def is_jsonl(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in (".jsonl", ".json")


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def is_input(path: Path) -> bool:
    return path.is_file() or is_saved_dataset(path)


def input_bytes(paths: list[Path]) -> int | None:
    """Uncompressed size of the inputs, or None when it is not known up front (compressed,
    parquet or a saved dataset)."""
    if any(p.suffix.lower() in (*COMPRESSED, ".parquet") or p.is_dir() for p in paths):
        return None
    return sum(p.stat().st_size for p in paths)


def _needs(module: str, extra: str, path: Path):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path}: reading it needs {module.split('.')[0]}, which is not installed "
                        f"(fix: pip install 'mlra_mega[{extra}]'; scripts/setup_cpu.sh installs it)") from None


def _open(path: Path) -> BinaryIO:
    if not path.is_file():
        raise DataError(f"{path}: input file not found (fix: check the --input paths)")
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.suffix.lower() == ".zst":
        return _ZstdLines(path, _needs("zstandard", "data", path))  # type: ignore[return-value]
    return path.open("rb")


class _ZstdLines:
    """The lines of a .zst file, frame after frame; a file cut short inside a frame is an error
    (zstandard's stream reader would end quietly there)."""

    def __init__(self, path: Path, zstandard) -> None:  # noqa: ANN001 - the module
        self.path, self.zstandard, self.file = path, zstandard, path.open("rb")

    def __enter__(self) -> "_ZstdLines":
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def __iter__(self) -> Iterator[bytes]:
        new = self.zstandard.ZstdDecompressor().decompressobj
        frame, rest, started = new(), b"", False
        while chunk := self.file.read(1 << 20):
            while chunk:
                if frame.eof:  # the next frame of a multi-frame file
                    frame = new()
                rest += frame.decompress(chunk)
                started = True
                chunk = frame.unused_data if frame.eof else b""
            *lines, rest = rest.split(b"\n")
            for line in lines:
                yield line + b"\n"
        if started and not frame.eof:
            raise self.zstandard.ZstdError("the input ends inside a frame")
        if rest:
            yield rest


def _column_documents(rows: Iterator[object], path: Path, opts: ReadOptions, stats: ReadStats) -> Iterator[str]:
    for row, text in enumerate(rows, start=1):
        if not isinstance(text, str):
            if opts.skip_bad_json:
                stats.skipped["missing_key"] += 1
                continue
            raise DataError(f"{path}: row {row}: {opts.json_key!r} holds {type(text).__name__}, not text "
                            "(fix: pass --json-key naming a text column, or --skip-bad-json)")
        stats.bytes_read += len(text.encode("utf-8", errors="replace"))
        if _keep(text, stats):
            yield text


def _parquet_documents(path: Path, opts: ReadOptions, stats: ReadStats) -> Iterator[str]:
    pq = _needs("pyarrow.parquet", "data", path)
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise DataError(f"{path}: not a parquet file ({str(exc).splitlines()[0][:200]}) "
                        "(fix: give a .parquet file, or rename it)") from None
    names = table.schema_arrow.names
    if opts.json_key not in names:
        raise DataError(f"{path}: no column {opts.json_key!r} (columns: {', '.join(names[:10])}) "
                        "(fix: pass --json-key naming the text column)")

    def rows() -> Iterator[object]:
        for batch in table.iter_batches(columns=[opts.json_key], batch_size=1024):
            yield from batch.column(0).to_pylist()

    yield from _column_documents(rows(), path, opts, stats)


def _saved_dataset_documents(path: Path, opts: ReadOptions, stats: ReadStats) -> Iterator[str]:
    datasets = _needs("datasets", "data", path)
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise DataError(f"{path}: a DatasetDict with splits {', '.join(data)} "
                            f"(fix: give one split's directory, e.g. {path / next(iter(data))})")
        data = next(iter(data.values()))
    if opts.json_key not in data.column_names:
        raise DataError(f"{path}: no column {opts.json_key!r} (columns: {', '.join(data.column_names[:10])}) "
                        "(fix: pass --json-key naming the text column)")

    def rows() -> Iterator[object]:
        for batch in data.select_columns([opts.json_key]).iter(batch_size=1024):
            yield from batch[opts.json_key]

    yield from _column_documents(rows(), path, opts, stats)


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
    except Exception as exc:
        if type(exc).__name__ != "ZstdError":
            raise
        raise DataError(f"{path}: the zstd file is cut short or damaged ({exc}) "
                        "(fix: download or compress it again)") from None


def _documents(path: Path, opts: ReadOptions, stats: ReadStats) -> Iterator[str]:
    if is_saved_dataset(path):
        yield from _saved_dataset_documents(path, opts, stats)
        return
    if path.suffix.lower() == ".parquet":
        yield from _parquet_documents(path, opts, stats)
        return
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
