"""Preprocessing throughput against raw sentencepiece, on the embedded sample corpus.

Prints a table and writes JSON: MB/s and tokens/s of `mlra_mega.data.preprocess` at 1 and 2
workers, beside `SentencePieceProcessor.encode(list_of_docs, num_threads=1)` on the same text in
the same run, and the per-worker ratio (goal: >= 0.9 of raw).

    python bench/preprocess.py [--copies 4] [--vocab 8000] [--rounds 3] [--out bench/results/preprocess.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, spread, table, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4, help="sample corpus repeated this many times")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "preprocess.json"))
    args = ap.parse_args()

    from mlra_mega.data.documents import ReadOptions, ReadStats, iter_documents
    from mlra_mega.data.preprocess import Progress, preprocess
    from mlra_mega.data.sample import sample_corpus
    from mlra_mega.data.tokenizer import load_tokenizer, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    source = sample_corpus()
    corpus = work / "corpus.jsonl"
    corpus.write_bytes(source.read_bytes() * args.copies)
    train_tokenizer([source], args.vocab, work / "tok", log=lambda s: None)
    tok = load_tokenizer(work / "tok")
    docs = list(iter_documents(corpus, ReadOptions(), ReadStats()))
    text_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    file_mb = corpus.stat().st_size / 1e6

    def raw() -> tuple[float, int]:
        t = time.perf_counter()
        tokens = sum(len(x) for x in tok.sp.encode(docs, num_threads=1))
        return time.perf_counter() - t, tokens

    def ours(workers: int, rep: int) -> tuple[float, int]:
        quiet = Progress(None, interactive=False, interval_s=1e9, log=lambda s: None)
        summary = preprocess([corpus], work / "tok", work / f"ds{workers}-{rep}", workers=workers, progress=quiet)
        return summary.seconds, summary.tokens

    # Rounds interleave the contestants, so a slow spell of the machine hits all of them.
    names = ["raw sp.encode(num_threads=1)", *(f"mlra-mega preprocess, {w} worker(s)" for w in args.workers)]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, int] = {}
    for rep in range(args.rounds):
        for name, w in zip(names, [None, *args.workers]):
            secs, tokens[name] = raw() if w is None else ours(w, rep)
            seconds[name].append(secs)
    rows = []
    raw_mb_s = file_mb / spread(seconds[names[0]])["median"]
    for name, w in zip(names, [1, *args.workers]):
        s = spread(seconds[name])
        mb_s = file_mb / s["median"]
        rows.append({"what": name, "workers": w, "seconds": s, "mb_per_s": mb_s,
                     "tokens_per_s": tokens[name] / s["median"], "ratio_per_worker": (mb_s / w) / raw_mb_s})
    print(table(["what", "workers", "seconds", "range %", "MB/s", "tokens/s", "per-worker ratio"],
                [[r["what"], r["workers"], r["seconds"]["median"], r["seconds"]["range_pct"], r["mb_per_s"],
                  r["tokens_per_s"], r["ratio_per_worker"]] for r in rows],
                title=f"corpus: {file_mb:.1f} MB of JSON Lines ({text_mb:.1f} MB of text, {len(docs)} documents), "
                      f"vocab {args.vocab}; {args.rounds} rounds; MB/s counts input file bytes; goal ratio >= 0.9"))
    write_json(args.out, {"corpus_mb": file_mb, "documents": len(docs), "vocab": args.vocab, "rounds": args.rounds,
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
