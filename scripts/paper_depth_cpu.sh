#!/bin/bash
# The paper's depth study on CPU, end to end: corpus (python3.11-doc), tokenizer, dataset, the LR
# probe and its rule, the 45-run sweep, the report. Resumable: finished steps are skipped.
#   bash scripts/paper_depth_cpu.sh        (from the repository root; about an hour on 2 cores)
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
mlra-mega sweep configs/paper/cpu-lr-probe.yaml
LR=$(python3 scripts/paper_lr_rule.py runs/paper-depth-cpu/lr-probe)
echo "[study] learning rate by the rule: $LR"
mlra-mega sweep configs/paper/cpu-depth.yaml "optim.lr=$LR"
mlra-mega report cpu-depth --tracking-uri "sqlite:///$PWD/runs/mlflow.db" --out docs/results/paper-depth-cpu
echo "[study] wall time $(( $(date +%s) - start )) s"
