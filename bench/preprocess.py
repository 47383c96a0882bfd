"""Preprocessing throughput against raw sentencepiece, on the embedded sample corpus.

Prints a table and writes JSON: MB/s and tokens/s of `mlra_mega.data.preprocess` at 1 and 2
workers, beside `SentencePieceProcessor.encode(list_of_docs, num_threads=1)` on the same text in
the same run, and the per-worker ratio (goal: >= 0.9 of raw).

    python bench/preprocess.py [--copies 4] [--vocab 8000] [--out bench/results/preprocess.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4, help="sample corpus repeated this many times")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="bench/results/preprocess.json")
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

    t = time.perf_counter()
    raw_tokens = sum(len(x) for x in tok.sp.encode(docs, num_threads=1))
    raw_s = time.perf_counter() - t
    rows = [{"what": "raw sp.encode(num_threads=1)", "workers": 1, "seconds": raw_s,
             "mb_per_s": file_mb / raw_s, "tokens_per_s": raw_tokens / raw_s, "ratio_per_worker": 1.0}]
    for w in args.workers:
        quiet = Progress(None, interactive=False, interval_s=1e9, log=lambda s: None)
        summary = preprocess([corpus], work / "tok", work / f"ds{w}", workers=w, progress=quiet)
        rows.append({"what": "mlra-mega preprocess", "workers": w, "seconds": summary.seconds,
                     "mb_per_s": summary.mb_per_s, "tokens_per_s": summary.tokens_per_s,
                     "ratio_per_worker": (summary.mb_per_s / w) / rows[0]["mb_per_s"]})

    print(f"corpus: {file_mb:.1f} MB of JSON Lines ({text_mb:.1f} MB of text, {len(docs)} documents), "
          f"vocab {args.vocab}; MB/s counts input file bytes")
    print(f"{'what':<30} {'workers':>7} {'seconds':>8} {'MB/s':>7} {'tokens/s':>12} {'per-worker ratio':>17}")
    for r in rows:
        print(f"{r['what']:<30} {r['workers']:>7} {r['seconds']:>8.2f} {r['mb_per_s']:>7.2f} "
              f"{r['tokens_per_s']:>12,.0f} {r['ratio_per_worker']:>17.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"corpus_mb": file_mb, "documents": len(docs), "vocab": args.vocab,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
