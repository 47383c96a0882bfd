"""The embedded sample corpus: English docstrings of Python's own standard library.

Every machine with Python has this text, so the quickstart needs no download. The docstrings
are read by parsing the standard library's source files with `ast`, never by importing them;
parsing takes a while (seconds to tens of seconds), so the corpus is written once as JSON Lines
(`{"text": ...}` per docstring, in a fixed order, duplicates dropped) to a cache file and reused.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from mlra_mega.files import atomic_path

__all__ = ["sample_corpus", "iter_docstrings", "default_sample_path"]

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_CHARS = 40


def default_sample_path() -> Path:
    base = Path(os.environ.get("MLRA_MEGA_CACHE", Path.home() / ".cache" / "mlra_mega"))
    return base / "sample" / f"stdlib-docstrings-py{sys.version_info.major}{sys.version_info.minor}.jsonl"


def _source_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def iter_docstrings(root: Path | None = None) -> Iterator[str]:
    """Docstrings of modules, classes and functions, in file order, each once."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for path in _source_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= MIN_CHARS and doc not in seen:
                    seen.add(doc)
                    yield doc


def sample_corpus(path: Path | None = None, *, max_documents: int | None = None) -> Path:
    """The corpus as a JSON Lines file, built on first use and cached at `path`."""
    path = path or default_sample_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for i, doc in enumerate(iter_docstrings()):
            if max_documents is not None and i >= max_documents:
                break
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return path
