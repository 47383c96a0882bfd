"""Preprocessing: exact round trip, worker-count independence, bad input, nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlra_mega.data.documents import ReadOptions
from mlra_mega.data.preprocess import Progress, preprocess
from mlra_mega.data.tokenizer import load_tokenizer
from mlra_mega.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def quiet_progress() -> Progress:
    return Progress(None, interactive=False, interval_s=1e9, log=lambda s: None)


def read_documents(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_round_trip_equals_a_direct_encode(tmp_path: Path, corpus_jsonl: Path, corpus_docs: list[str],
                                           tokenizer_dir: Path) -> None:
    summary = preprocess([corpus_jsonl], tokenizer_dir, tmp_path / "ds", progress=quiet_progress())
    tok = load_tokenizer(tokenizer_dir)
    expected = [ids + [tok.eod] for ids in tok.sp.encode(corpus_docs)]
    assert read_documents(tmp_path / "ds") == expected
    assert summary.documents == len(corpus_docs) and summary.tokens == sum(map(len, expected))
    card = json.loads((tmp_path / "ds.json").read_text())
    assert card["tokenizer"]["model_sha256"] == tok.card.model_sha256 and card["dtype"] == "uint16"


def test_two_workers_write_the_same_bytes(tmp_path: Path, corpus_jsonl: Path, tokenizer_dir: Path) -> None:
    preprocess([corpus_jsonl], tokenizer_dir, tmp_path / "w1", workers=1, progress=quiet_progress())
    preprocess([corpus_jsonl], tokenizer_dir, tmp_path / "w2", workers=2, progress=quiet_progress())
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_text_input_blank_line_documents(tmp_path: Path, tokenizer_dir: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_bytes(b"Hello world.\nSecond line.\n\nAnother doc \xff here.\n\n\n")
    summary = preprocess([p], tokenizer_dir, tmp_path / "t", options=ReadOptions(doc_boundary="blank-line"),
                         progress=quiet_progress())
    tok = load_tokenizer(tokenizer_dir)
    docs = ["Hello world.\nSecond line.", "Another doc \ufffd here."]
    assert read_documents(tmp_path / "t") == [ids + [tok.eod] for ids in tok.sp.encode(docs)]
    assert summary.replaced_utf8 == 1


def test_counted_skips_in_the_summary(tmp_path: Path, tokenizer_dir: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "kept"}\n{"text": ""}\nnot json\n{"other": 1}\n{"text": "bad \xff"}\n')
    summary = preprocess([p], tokenizer_dir, tmp_path / "d", progress=quiet_progress(),
                         options=ReadOptions(skip_bad_json=True, invalid_utf8="skip"))
    assert summary.documents == 1
    assert summary.skipped == {"empty": 1, "bad_json": 1, "missing_key": 1, "invalid_utf8": 1}
    assert "skipped: bad_json 1, empty 1, invalid_utf8 1, missing_key 1" in summary.line()


def test_no_tokens_is_an_error_and_leaves_nothing(tmp_path: Path, tokenizer_dir: Path) -> None:
    p = tmp_path / "empty.txt"
    p.write_text("\n   \n\n")
    with pytest.raises(DataError, match="yield no tokens"):
        preprocess([p], tokenizer_dir, tmp_path / "e", progress=quiet_progress())
    assert sorted(x.name for x in tmp_path.iterdir()) == ["empty.txt"]


def test_bad_json_stops_with_file_and_line_and_leaves_nothing(tmp_path: Path, tokenizer_dir: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        preprocess([p], tokenizer_dir, tmp_path / "d", progress=quiet_progress())
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.jsonl"]


def test_existing_output_needs_overwrite(tmp_path: Path, corpus_jsonl: Path, tokenizer_dir: Path) -> None:
    preprocess([corpus_jsonl], tokenizer_dir, tmp_path / "ds", progress=quiet_progress())
    with pytest.raises(DataError, match="already exists .*--overwrite"):
        preprocess([corpus_jsonl], tokenizer_dir, tmp_path / "ds", progress=quiet_progress())
    preprocess([corpus_jsonl], tokenizer_dir, tmp_path / "ds", overwrite=True, progress=quiet_progress())


def test_plain_progress_lines() -> None:
    lines: list[str] = []
    progress = Progress(1_000_000, interactive=False, interval_s=0.0, log=lines.append)
    progress.update(500_000, 10, 500_000)
    assert lines and "0.5 MB (50%)" in lines[0] and "MB/s" in lines[0] and "docs/s" in lines[0]


def _big_input(tmp_path: Path, corpus_docs: list[str], copies: int) -> Path:
    p = tmp_path / "big.jsonl"
    with p.open("w") as f:
        for i in range(copies):
            for d in corpus_docs:
                f.write(json.dumps({"text": f"{i} {d}"}) + "\n")
    return p


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["SIGKILL", "SIGINT", "SIGTERM"])
def test_interrupted_run_leaves_no_final_files(tmp_path: Path, corpus_docs: list[str], tokenizer_dir: Path,
                                               sig: signal.Signals) -> None:
    big = _big_input(tmp_path, corpus_docs, copies=12)  # ~10 MB: seconds of work
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mlra_mega", "preprocess", "--input", str(big), "--tokenizer",
                             str(tokenizer_dir), "--output-prefix", str(out / "ds"), "--workers", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not any(".tmp-" in p.name for p in out.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "preprocess never started writing"
        time.sleep(0.01)
    # Stopped while it writes, so the signal finds it mid-way (never after it finished), whatever the load.
    os.kill(proc.pid, signal.SIGSTOP)
    assert proc.poll() is None and not [p for p in out.iterdir() if ".tmp-" not in p.name], "finished too soon"
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # a hang: fail without leaving the process behind
            proc.kill()
    finals = [p.name for p in out.iterdir() if ".tmp-" not in p.name]
    assert finals == [], finals
    if sig != signal.SIGKILL:  # a catchable signal also cleans up its temporary files
        assert list(out.iterdir()) == [] and proc.returncode != 0


def test_cli_preprocess(tmp_path: Path, corpus_jsonl: Path, tokenizer_dir: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    from mlra_mega.cli import main

    assert main(["preprocess", "--input", str(corpus_jsonl), "--tokenizer", str(tokenizer_dir),
                 "--output-prefix", str(tmp_path / "c")]) == 0
    assert "[preprocess] 1500 documents" in capsys.readouterr().out
    assert np.fromfile(tmp_path / "c.bin", dtype=np.uint16).size > 0
    assert main(["preprocess", "--input", str(corpus_jsonl), "--tokenizer", str(tmp_path),
                 "--output-prefix", str(tmp_path / "d")]) == 2
    assert "no tokenizer here" in capsys.readouterr().err


def test_parquet_saved_datasets_and_zstd_give_the_dataset_of_the_same_jsonl(tmp_path: Path, corpus_docs: list[str],
                                                                           tokenizer_dir: Path) -> None:
    """The same documents as JSON Lines, .jsonl.zst, parquet (text in another column) and a
    `datasets` save_to_disk directory (a Dataset, and a DatasetDict of one split): the same bytes."""
    datasets = pytest.importorskip("datasets")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    zstandard = pytest.importorskip("zstandard")
    docs = corpus_docs[:300]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.read_bytes()))
    pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), tmp_path / "docs.parquet",
                   row_group_size=64)
    saved = datasets.Dataset.from_dict({"content": docs})
    saved.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "saved_dict"))
    preprocess([jsonl], tokenizer_dir, tmp_path / "ref", progress=quiet_progress())
    want = {ext: (tmp_path / f"ref{ext}").read_bytes() for ext in (".bin", ".idx")}
    for name, key in (("docs.jsonl.zst", "text"), ("docs.parquet", "content"), ("saved", "content"),
                      ("saved_dict", "content")):
        out = tmp_path / f"out-{name.replace('.', '-')}"
        summary = preprocess([tmp_path / name], tokenizer_dir, out, options=ReadOptions(json_key=key),
                             progress=quiet_progress())
        assert summary.documents == len(docs), name
        assert {ext: Path(f"{out}{ext}").read_bytes() for ext in (".bin", ".idx")} == want, name
    with pytest.raises(DataError, match="no column 'text' .*columns: id, content.*--json-key"):
        preprocess([tmp_path / "docs.parquet"], tokenizer_dir, tmp_path / "bad", progress=quiet_progress())
    datasets.DatasetDict({"train": saved, "test": saved}).save_to_disk(str(tmp_path / "two_splits"))
    with pytest.raises(DataError, match="splits train, test .*one split's directory"):
        preprocess([tmp_path / "two_splits"], tokenizer_dir, tmp_path / "bad", options=ReadOptions(json_key="content"),
                   progress=quiet_progress())
    (tmp_path / "cut.jsonl.zst").write_bytes((tmp_path / "docs.jsonl.zst").read_bytes()[:200])
    with pytest.raises(DataError, match="cut.jsonl.zst: the zstd file is cut short or damaged"):
        preprocess([tmp_path / "cut.jsonl.zst"], tokenizer_dir, tmp_path / "bad", progress=quiet_progress())
