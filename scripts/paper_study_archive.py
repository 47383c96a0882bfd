"""Keeps the depth study's finished members in the repository, so the sweep can go on in parts
on machines that do not keep `runs/` (a member is 3 files: config.yaml, summary.json and its
metrics.jsonl, gzipped; checkpoints are not kept, a finished member needs none).

    python scripts/paper_study_archive.py save    SWEEP_DIR ARCHIVE_DIR   finished members -> archive
    python scripts/paper_study_archive.py restore ARCHIVE_DIR SWEEP_DIR   archived members -> sweep dir

`restore` never touches a member directory that exists; the sweep skips a restored member as
finished (its summary.json says so) and the study's tables read it like any other.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

import yaml

KEPT = ("config.yaml", "summary.json")


def finished(run_dir: Path) -> bool:
    try:
        steps = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"]
        return json.loads((run_dir / "summary.json").read_text()).get("steps", 0) >= steps
    except (OSError, ValueError, KeyError, TypeError):
        return False


def save(sweep_dir: Path, archive: Path) -> int:
    count = 0
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and finished(p)):
        dest = archive / run_dir.name
        if (dest / "metrics.jsonl.gz").is_file():
            continue
        tmp = archive / (run_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in KEPT:
            shutil.copy2(run_dir / name, tmp / name)
        with (run_dir / "metrics.jsonl").open("rb") as src, gzip.open(tmp / "metrics.jsonl.gz", "wb") as out:
            shutil.copyfileobj(src, out)
        tmp.rename(dest)
        count += 1
    print(f"[archive] {count} member(s) added to {archive}")
    return 0


def restore(archive: Path, sweep_dir: Path) -> int:
    count = 0
    for member in sorted(p for p in archive.iterdir() if (p / "metrics.jsonl.gz").is_file()) if archive.is_dir() else []:
        dest = sweep_dir / member.name
        if dest.exists():
            continue
        tmp = sweep_dir / (member.name + ".restoring")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in KEPT:
            shutil.copy2(member / name, tmp / name)
        with gzip.open(member / "metrics.jsonl.gz", "rb") as src, (tmp / "metrics.jsonl").open("wb") as out:
            shutil.copyfileobj(src, out)
        tmp.rename(dest)
        count += 1
    print(f"[archive] {count} member(s) restored into {sweep_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["save", "restore"])
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if not args.src.is_dir() and args.action == "save":
        print(f"error: {args.src} is not a directory", file=sys.stderr)
        return 2
    return save(args.src, args.dest) if args.action == "save" else restore(args.src, args.dest)


if __name__ == "__main__":
    sys.exit(main())
