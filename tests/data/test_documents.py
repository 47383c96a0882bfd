"""Corpus readers: text by line or blank line, JSON Lines, gzip, and every bad input counted."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from mlra_mega.data.documents import ReadOptions, ReadStats, iter_documents
from mlra_mega.errors import DataError


def read(path: Path, **opts) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    return list(iter_documents(path, ReadOptions(**opts), stats)), stats


def test_text_by_line_and_by_blank_line(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("one\ntwo\n\n\nthree\nfour\n   \n")
    docs, stats = read(p)
    assert docs == ["one", "two", "three", "four"] and stats.skipped["empty"] == 3
    docs, stats = read(p, doc_boundary="blank-line")
    assert docs == ["one\ntwo", "three\nfour"] and stats.documents == 2
    assert stats.bytes_read == p.stat().st_size


def test_gzip_and_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"text": "first"}\n{"text": "  "}\n\n{"body": "x", "text": "second"}\n')
    docs, stats = read(p)
    assert docs == ["first", "second"] and stats.skipped["empty"] == 1


def test_invalid_utf8_is_replaced_or_skipped_and_counted(tmp_path: Path) -> None:
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good line\nbad \xff\xfe line\nalso good\n")
    docs, stats = read(p)
    assert docs == ["good line", "bad \ufffd\ufffd line", "also good"] and stats.replaced_utf8 == 1
    docs, stats = read(p, invalid_utf8="skip")
    assert docs == ["good line", "also good"] and stats.skipped["invalid_utf8"] == 1


@pytest.mark.parametrize("line,words", [
    ('{"text": "unterminated\n', "not valid JSON"),
    ('{"body": "no text key"}\n', "no 'text' key"),
    ('["a list"]\n', "no 'text' key"),
    ('{"text": 42}\n', "holds int, not text"),
])
def test_bad_json_names_file_and_line_or_is_skipped(tmp_path: Path, line: str, words: str) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n' + line + '{"text": "after"}\n')
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{words}"):
        read(p)
    docs, stats = read(p, skip_bad_json=True)
    assert docs == ["fine", "after"] and sum(stats.skipped.values()) == 1


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="input file not found"):
        read(tmp_path / "nope.txt")
