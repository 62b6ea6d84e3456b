#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: the CUDA kernel tests, then the full benchmark
# (which writes bench/results/<device-slug>.json). Extra arguments go to bench/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
"$PY" -m pytest -q -m cuda tests/kernels
"$PY" bench/run.py "$@"
