#!/usr/bin/env bash
# CPU set-up for a fresh machine: torch 2.13.0 (CPU wheel) first, then mlra_mega and its
# dependencies with torch held there, so nothing can pull a multi-GB CUDA build.
# GPU users skip this script and `pip install -e .` beside the CUDA torch their image ships.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
constraints="$here/constraints/cpu.txt"

# PIP_CONSTRAINT (unlike -c) also reaches the isolated build environments of source builds
# such as DeepSpeed's, which would otherwise resolve torch freely.
export PIP_CONSTRAINT="$constraints"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# DeepSpeed compiles no ops at install; the ones we use on CPU are torch's own.
export DS_BUILD_OPS=0

echo "[setup] torch 2.13.0 (CPU) ..."
"$py" -m pip install -q "torch==2.13.0"
echo "[setup] mlra_mega with dev, hf, eval and data extras (DeepSpeed builds from source, about 80 s the first time) ..."
"$py" -m pip install -q -e "$here[dev,hf,eval,data]"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
"$py" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"expected torch 2.13.0, found {torch.__version__}"
print(f"[setup] done: torch {torch.__version__}")
PY
