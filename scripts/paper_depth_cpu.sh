#!/bin/bash
# The paper's depth study on CPU, end to end: corpus (python3.11-doc), tokenizer, dataset, the
# learning-rate bracket, the 36-run sweep, the tables. Resumable: finished steps and runs are
# skipped, so it may be run in several parts (about 3.5 hours on 2 cores in all).
#   bash scripts/paper_depth_cpu.sh        (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=runs/paper-data
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
[ -f $DATA/docs.jsonl ] || python3 scripts/paper_corpus.py $DATA/docs.jsonl
[ -f $DATA/tokenizer/tokenizer.model ] || mlra-mega tokenizer train --input $DATA/docs.jsonl --vocab-size 4096 \
  --output $DATA/tokenizer
[ -f $DATA/docs.idx ] || mlra-mega preprocess --input $DATA/docs.jsonl --tokenizer $DATA/tokenizer \
  --output-prefix $DATA/docs --workers 2
[ "${SKIP_BRACKET:-0}" = 1 ] || python3 scripts/paper_lr_bracket.py --out runs/paper-depth-cpu/lr-bracket
# (SKIP_BRACKET=1: a later part of the study, the bracket ran in the first)
# The sweep's rates were written into cpu-study.yaml from the committed bracket: check they still agree.
[ "${SKIP_BRACKET:-0}" = 1 ] || python3 - <<'PY'
import json, sys
b = json.load(open("runs/paper-depth-cpu/lr-bracket/bracket.json"))
if (b["lr_star"], b["lr_mlra"]) != (1e-3, 2e-3):
    sys.exit(f"error: the bracket now gives lr* = {b['lr_star']:g}, lr_mlra = {b['lr_mlra']:g}; "
             "configs/paper/cpu-study.yaml was written for 1e-3 / 2e-3: update its rates")
PY
SWEEP=runs/paper-depth-cpu-v2/cpu-study
ARCHIVE=docs/results/paper-depth-cpu/members
mkdir -p $SWEEP
python3 scripts/paper_study_archive.py restore $ARCHIVE $SWEEP  # the members finished in earlier parts
mlra-mega sweep configs/paper/cpu-study.yaml
python3 scripts/paper_study_archive.py save $SWEEP $ARCHIVE
python3 scripts/paper_study_report.py $SWEEP --out docs/results/paper-depth-cpu/tables.md \
  --plots docs/results/paper-depth-cpu
echo "[study] wall time $(( $(date +%s) - start )) s"
