"""Files written whole or not at all, and the hashes that say a file is the one recorded.

Every writer of a file that a later reader trusts (run directories, checkpoints, locks, markers,
tokenizers, buffers) goes through `atomic_write_*` or `atomic_path`: the bytes go to a temporary
beside the target (same file system, so the final `os.replace` is atomic) and a reader sees the
old file or the new one, never half of one. A failure removes the temporary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "bytes_sha256", "file_sha256"]


def _temporary(path: Path) -> Path:
    # The pid keeps two processes writing the same target (two ranks, two jobs) apart.
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; it replaces `path` when the block ends
    without an exception (a file or a directory), and is removed when it does not."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
