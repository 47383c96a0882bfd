#!/usr/bin/env bash
# On the air-gapped GPU node: installs the wheelhouse of scripts/gpu_wheelhouse.sh beside the
# node's own CUDA torch, with no index (nothing is fetched), then checks the imports.
#
#     bash scripts/gpu_install.sh WHEELHOUSE
#
# mlra_mega goes in without its dependencies: MLflow, SciPy and matplotlib (tracking, the
# stability correlation, reports) are not needed for training with tracking off.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels="${1:?usage: gpu_install.sh WHEELHOUSE}"
py="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0

"$py" - <<'PY'
import importlib.metadata as m
try:
    print(f"[install] torch {m.version('torch')} is here; it stays")
except m.PackageNotFoundError:
    raise SystemExit("[install] error: no torch on this node: install its CUDA build first (docs/gpu.md)")
PY
start=$(date +%s)
"$py" -m pip install -q --no-index --find-links "$wheels" -r "$here/constraints/gpu-node.txt"
"$py" -m pip install -q --no-index --no-deps --find-links "$wheels" mlra_mega
echo "[install] done in $(( $(date +%s) - start ))s"
if [[ "${SKIP_IMPORT_CHECK:-0}" != 1 ]]; then
    "$py" -c "import megatron.core, deepspeed, sentencepiece, mlra_mega.train.run; print('[install] imports ok')"
fi
