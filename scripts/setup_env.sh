#!/usr/bin/env bash
# Creates the virtual environment (when missing) and installs the project into it.
# torch: the normal CUDA build where an NVIDIA GPU answers, else the CPU build
# (on the project's CPU machines `torch==2.13.0` resolves to a small CPU wheel on local disk).
# Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.11.0".
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

if [ -z "${TORCH_SPEC:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        TORCH_SPEC="torch>=2.6"
    else
        TORCH_SPEC="torch==2.13.0"
    fi
fi
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_SPEC"
    "${pip[@]}" "$TORCH_SPEC"
fi
echo "[setup] installing the project and its test tools"
"${pip[@]}" -e ".[dev]"
