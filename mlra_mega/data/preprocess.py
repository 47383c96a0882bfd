"""Raw text / JSON Lines -> a megatron-core indexed dataset (PREFIX.bin, PREFIX.idx, PREFIX.json).

Documents are read in order in the main process, tokenized in batches by N worker processes
(in order, so the output does not depend on N), an end-of-document token appended to each, and
written with megatron-core's `IndexedDatasetBuilder`. Everything is written under temporary
names and renamed only once complete, so an interrupted run (Ctrl-C, SIGTERM, SIGKILL) leaves
no `.bin` / `.idx` under the final names. The card `PREFIX.json` names the tokenizer (path and
model hash), so a dataset made by another tokenizer can be refused at train start.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from mlra_mega.data.documents import ReadOptions, ReadStats, input_bytes, is_input, iter_documents
from mlra_mega.data.tokenizer import Tokenizer, load_tokenizer
from mlra_mega.errors import DataError

__all__ = ["PreprocessSummary", "preprocess", "dataset_card_path", "Progress"]

BATCH_BYTES = 1 << 20  # text per tokenization task: large enough to amortise the IPC


@dataclass
class PreprocessSummary:
    output_prefix: str
    documents: int
    tokens: int
    bytes_read: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)
    replaced_utf8: int = 0
    workers: int = 1

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def line(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"[preprocess] {self.documents} documents, {self.tokens} tokens, {self.bytes_read / 1e6:.1f} MB "
                f"in {self.seconds:.1f}s ({self.mb_per_s:.2f} MB/s, {self.tokens_per_s:,.0f} tokens/s, "
                f"{self.workers} workers); skipped: {skipped}; invalid UTF-8 replaced in {self.replaced_utf8}")


def dataset_card_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


class Progress:
    """A tqdm bar (MB/s, docs/s) when interactive; a plain line every `interval_s` otherwise."""

    def __init__(self, total_bytes: int | None, interactive: bool | None = None, interval_s: float = 10.0,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> None:
        self.total, self.log, self.interval = total_bytes, log, interval_s
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.start = self.last = time.perf_counter()
        self.bar = None
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr)

    def update(self, bytes_done: int, docs_done: int, delta_bytes: int) -> None:
        now = time.perf_counter()
        rate_docs = docs_done / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(delta_bytes)
            self.bar.set_postfix(docs_per_s=f"{rate_docs:,.0f}", refresh=False)
        elif now - self.last >= self.interval:
            self.last = now
            pct = f" ({bytes_done / self.total:.0%})" if self.total else ""
            self.log(f"[preprocess] {bytes_done / 1e6:.1f} MB{pct}, "
                     f"{bytes_done / 1e6 / max(now - self.start, 1e-9):.2f} MB/s, {rate_docs:,.0f} docs/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- worker side

_WORKER_TOKENIZER: Tokenizer | None = None
_WORKER_DTYPE: type = np.int32


def _init_worker(tokenizer_path: str, dtype_name: str, eod_id: int) -> None:
    global _WORKER_TOKENIZER, _WORKER_DTYPE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's flag: terminate() must end us
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path, eod_id)
    _WORKER_DTYPE = np.dtype(dtype_name).type


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_TOKENIZER is not None
    return _WORKER_TOKENIZER.encode_documents(texts, _WORKER_DTYPE)


# ---------------------------------------------------------------- main side


def _batches(paths: list[Path], opts: ReadOptions, stats: ReadStats) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for path in paths:
        for doc in iter_documents(path, opts, stats):
            batch.append(doc)
            size += len(doc)
            if size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass  # never there, or the place refuses writes: the first error is the one to report


def _clean_up(builder, pool, temps: list[Path]) -> None:  # noqa: ANN001 - megatron's builder, a Pool
    if builder is not None and not builder.data_file.closed:
        try:
            builder.data_file.close()
        except OSError:
            pass
    _remove(temps)  # first: nothing below may keep the temporaries on disk
    if pool is not None:
        # terminate() can hang under load (workers blocked on pipes nobody reads): give it a while,
        # then kill the workers, which unblocks it.
        ender = threading.Thread(target=lambda: (pool.terminate(), pool.join()), daemon=True)
        ender.start()
        ender.join(timeout=20)
        if ender.is_alive():
            for child in psutil.Process().children(recursive=True):
                child.kill()
            ender.join(timeout=20)


def preprocess(inputs: list[str | Path], tokenizer_path: str | Path, output_prefix: str | Path, *,
               workers: int = 1, options: ReadOptions = ReadOptions(), overwrite: bool = False,
               progress: Progress | None = None, eod_id: int | None = None) -> PreprocessSummary:
    """Tokenizes `inputs` into PREFIX.bin / PREFIX.idx / PREFIX.json; returns the summary."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    paths = [Path(p) for p in inputs]
    for p in paths:
        if not is_input(p):
            raise DataError(f"{p}: input file not found (fix: check the --input paths; a directory must be "
                            "one saved by datasets' save_to_disk)")
    if workers < 1:
        raise DataError(f"--workers {workers}: must be >= 1 (fix: pass --workers 1 or more)")
    tokenizer = load_tokenizer(tokenizer_path, eod_id)
    prefix = Path(output_prefix)
    # Renamed in this order at the end: the .idx last, so megatron sees no dataset until all is there.
    finals = [dataset_card_path(prefix), Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    existing = [str(p) for p in finals if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} already exists (fix: pass --overwrite, or choose another --output-prefix)")
    tag = f".tmp-{os.getpid()}"
    temps = [Path(f"{p}{tag}") for p in finals]
    tmp_card, tmp_bin, tmp_idx = temps

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    stats = ReadStats()
    progress = progress or Progress(input_bytes(paths))
    start = time.perf_counter()
    tokens = documents = 0
    pool = None
    builder = None
    # SIGINT and SIGTERM only set a flag, checked between batches and before the renames: an
    # exception raised from the handler can land where Python swallows it (an at-fork hook of the
    # pool), and the run would then finish as if never interrupted.
    stop: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, frame):  # noqa: ANN001 - signal handler signature
        stop.append(signum)

    def check_stop() -> None:
        if stop:
            raise KeyboardInterrupt

    for s in previous:
        signal.signal(s, on_signal)
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        batches = _batches(paths, options, stats)
        if workers == 1:
            encoded = (tokenizer.encode_documents(b, dtype) for b in batches)
        else:
            # fork where the platform has it: no re-import per worker (the workers touch no torch).
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = mp.get_context(method).Pool(workers, initializer=_init_worker,
                                                initargs=(str(tokenizer.model_path), np.dtype(dtype).name, tokenizer.eod))
            encoded = pool.imap(_encode_batch, batches)
        last_bytes = 0
        for flat, lengths in encoded:
            check_stop()
            # One write per batch: each document is one sequence, so the batch goes in as its
            # sequences and the document boundaries are set, one per sequence, before finalize.
            builder.add_document(flat, lengths.tolist())
            tokens += int(flat.size)
            documents += len(lengths)
            progress.update(stats.bytes_read, documents, stats.bytes_read - last_bytes)
            last_bytes = stats.bytes_read
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        if tokens == 0:
            raise DataError(f"the inputs yield no tokens ({stats.documents} documents kept, skipped "
                            f"{dict(stats.skipped)}) (fix: check the --input files and --json-key)")
        builder.document_indices = list(range(len(builder.sequence_lengths) + 1))
        check_stop()
        builder.finalize(str(tmp_idx))
        seconds = time.perf_counter() - start
        summary = PreprocessSummary(str(prefix), documents, tokens, stats.bytes_read, seconds,
                                    dict(stats.skipped), stats.replaced_utf8, workers)
        card = {
            "tokenizer": {"path": str(tokenizer.model_path.resolve()), "model_sha256": tokenizer.card.model_sha256,
                          "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod},
            "inputs": [str(p.resolve()) for p in paths], "dtype": np.dtype(dtype).name,
            "options": asdict(options), "summary": asdict(summary),
        }
        tmp_card.write_text(json.dumps(card, indent=2) + "\n")
        check_stop()
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
        return summary
    except OSError as exc:  # reading errors are DataErrors already: this is the output
        _clean_up(builder, pool, temps)
        raise DataError(f"cannot write the dataset at {prefix}: {exc.strerror or exc} "
                        f"({exc.filename or prefix}) (fix: choose a writable --output-prefix with free space)") from None
    except BaseException:
        _clean_up(builder, pool, temps)
        raise
    finally:
        progress.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
