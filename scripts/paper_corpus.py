"""The depth study's corpus: the reStructuredText sources of Debian's python3.11-doc, one JSON Lines
document per file, in a seeded order (so the validation split, the last documents, is not one
topic). Installs the package with apt-get if its files are missing.

    python scripts/paper_corpus.py OUT.jsonl [--seed 1234]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if not SOURCES.is_dir():
        if shutil.which("apt-get") is None:
            print(f"error: {SOURCES} is missing and apt-get is not here: install python3.11-doc", file=sys.stderr)
            return 2
        subprocess.run(["apt-get", "install", "-y", "-q", "python3.11-doc"], check=True)
    files = sorted(SOURCES.rglob("*.txt"))
    random.Random(args.seed).shuffle(files)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with out.open("w", encoding="utf-8") as f:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                f.write(json.dumps({"text": text, "source": str(path.relative_to(SOURCES))}) + "\n")
                total += len(text.encode())
    print(f"[corpus] {len(files)} files, {total / 1e6:.1f} MB -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
