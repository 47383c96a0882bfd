#!/bin/bash
# PP=1 reference (1 process), then PP=2 (2 processes; prints the comparison), then path B smoke.
set -e
mkdir -p /tmp/pp && cd "$(dirname "$0")/../.."  # outputs go to /tmp/pp
export OMP_NUM_THREADS=1
python3 scripts/probes/pipeline_path_a.py 2>&1 | grep -v -i warn
python3 -m torch.distributed.run --standalone --nproc-per-node=2 scripts/probes/pipeline_path_a.py 2>&1 | grep -v -i warn
python3 -m torch.distributed.run --standalone --nproc-per-node=2 scripts/probes/pipeline_path_b.py 2>&1 | grep -v -i warn
