"""Property-based fuzzing of the two readers of user input: the config loader and the preprocess
reader. Thousands of generated overrides, YAML documents and input lines; each ends in a result
or in our one-line error, never in a traceback or a hang (a 5 s deadline per example)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlra_mega.config import _all_dotted_keys, load_config
from mlra_mega.data.documents import ReadOptions, ReadStats, iter_documents
from mlra_mega.errors import ConfigError, DataError

def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=5000, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KEYS = _all_dotted_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
VALUES = st.one_of(st.text(max_size=40), st.sampled_from(["nan", "inf", "-inf", "1e999", "-1", "0", "null", "[]",
                                                          "[1,2", "true", "0x10", "1_000", "  3 ", "\n", "a=b"]),
                   st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True).map(repr))


def assert_one_line(exc: ConfigError) -> None:
    text = str(exc)
    assert exc.field and len(text) < 3000


@fuzz(2000)
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=20)), VALUES), max_size=4))
def test_overrides_end_in_a_config_or_a_config_error(pairs: list[tuple[str, str]]) -> None:
    try:
        load_config(None, [f"{k}={v}" for k, v in pairs])
    except ConfigError as exc:
        assert_one_line(exc)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                    st.text(max_size=20))
TREES = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from([k.rsplit(".", 1)[-1] for k in KEYS]), st.text(max_size=8)),
                    children, max_size=4)), max_leaves=12)
DOCUMENTS = st.one_of(
    st.dictionaries(st.sampled_from(SECTIONS), TREES, max_size=4).map(lambda d: yaml.safe_dump(d)),
    st.text(max_size=200),
    st.lists(st.sampled_from(["model:", "  num_layers: 2", "  num_layers: 3", "a: &x [1, 2]", "b: *x", "c: *y",
                              "train: {steps: 3", "- 1", "? [a]", ": b", "!!python/object:os.system x", "\t",
                              "optim:", "  lr: .nan", "  betas: [0.9, .inf]", "%YAML 1.1", "---"]),
             max_size=8).map("\n".join))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@fuzz(1500)
@given(DOCUMENTS)
def test_yaml_documents_end_in_a_config_or_a_config_error(scratch: Path, text: str) -> None:
    path = scratch / "cfg.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path)
    except ConfigError as exc:
        assert_one_line(exc)


LINES = st.lists(st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b'{"text": "hello"}', b'{"text": 3}', b'{"other": "x"}', b"[1, 2]", b'{"text": "\xff"}',
                     b'{"text": "a\\u0000b"}', b"null", b"", b"\r", b'{"text": "' + b"x" * 300 + b'"}']),
), max_size=12)


@fuzz(1500)
@given(LINES, st.sampled_from([".jsonl", ".txt", ".jsonl.gz", ".txt.gz"]), st.booleans(),
       st.sampled_from(["line", "blank-line"]), st.sampled_from(["replace", "skip"]), st.booleans())
def test_input_lines_end_in_documents_or_a_data_error(scratch: Path, lines: list[bytes], suffix: str, compress: bool,
                                                       boundary: str, utf8: str, skip_bad: bool) -> None:
    data = b"\n".join(lines)
    if suffix.endswith(".gz") and compress:
        data = gzip.compress(data)  # else: a .gz name on bytes that are not gzip
    path = scratch / f"input{suffix}"
    path.write_bytes(data)
    options = ReadOptions(doc_boundary=boundary, invalid_utf8=utf8, skip_bad_json=skip_bad)
    try:
        docs = list(iter_documents(path, options, ReadStats()))
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    assert all(isinstance(d, str) and d.strip() for d in docs)
