#!/usr/bin/env bash
# Builds the wheelhouse for an air-gapped GPU node (docs/gpu.md): wheels for the node's Python
# (default 3.12, x86_64 Linux) of everything in constraints/gpu-node.txt, DeepSpeed built here
# with no ops, and mlra_mega itself; torch is not among them (the node's CUDA build stays).
#
#     bash scripts/gpu_wheelhouse.sh [OUT_DIR]      # default wheelhouse/, about 30 MB
#
# Needs PyPI (here, not on the node). NODE_PYTHON=3.13 for another Python.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(mkdir -p "${1:-wheelhouse}" && cd "${1:-wheelhouse}" && pwd)"
py="${PYTHON:-python3}"
node_py="${NODE_PYTHON:-3.12}"
reqs="$here/constraints/gpu-node.txt"
limit_mib=64
export PIP_DISABLE_PIP_VERSION_CHECK=1

listed=$(grep -v '^\s*#' "$reqs" | sed 's/#.*//' | grep -v '^\s*$')
target=(--only-binary=:all: --python-version "$node_py" --implementation cp
        --abi "cp${node_py/./}" --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64
        --platform linux_x86_64 -d "$out")
echo "[wheelhouse] Python $node_py wheels from PyPI -> $out"
# megatron-core and DeepSpeed require torch: resolving them would fetch a CUDA torch, so
# megatron-core comes alone; everything else is resolved (matching pairs such as pydantic and
# pydantic-core), and gpu_install.sh checks the set installs with no index.
# shellcheck disable=SC2086
"$py" -m pip download -q --no-deps "${target[@]}" $(echo "$listed" | grep '^megatron-core')
# shellcheck disable=SC2086
"$py" -m pip download -q "${target[@]}" $(echo "$listed" | grep -v -e '^megatron-core' -e '^deepspeed')

echo "[wheelhouse] DeepSpeed from source with no ops (a pure-Python wheel) ..."
ds=$(echo "$listed" | grep '^deepspeed' | tr -d ' ')
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$ds"

echo "[wheelhouse] mlra_mega ..."
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$here"

size_kib=$(du -sk "$out" | cut -f1)
echo "[wheelhouse] $(ls "$out" | wc -l) wheels, $((size_kib / 1024)) MiB in $out"
if (( size_kib > limit_mib * 1024 )); then
    echo "[wheelhouse] error: over the node's ${limit_mib} MiB limit" >&2
    exit 1
fi
