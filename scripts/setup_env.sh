#!/usr/bin/env bash
# Creates the virtual environment (when missing) and installs the project into it.
#
# torch first, unless it is already importable there (so running this again is cheap):
# - an NVIDIA GPU answers (nvidia-smi -L): the normal CUDA build, `torch>=2.6` from the default index;
# - no GPU: the CPU build. PyTorch's CPU wheel index first (TORCH_CPU_INDEX, with a short timeout),
#   then the default index, where on the project's CPU machines `torch==2.13.0` resolves to a small
#   CPU wheel on local disk (pip's configuration there). TORCH_CPU_INDEX= (empty) skips the first try.
# - TORCH_SPEC overrides both, installed as given from the default index, e.g. TORCH_SPEC="torch==2.11.0".
# Then the project and its test tools, pinned by constraints.txt (the versions the tests passed with;
# SETUP_CONSTRAINTS=FILE for another file, SETUP_CONSTRAINTS= (empty) for none).
# SETUP_DRY_RUN=1 prints the commands that would change something instead of running them.
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
constraints="${SETUP_CONSTRAINTS-$root/constraints.txt}"
cpu_index="${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}"
cpu_spec="torch==2.13.0"
dry_run="${SETUP_DRY_RUN:-0}"

run() {
    if [ "$dry_run" = 1 ]; then
        echo "[setup] would run: $*"
    else
        "$@"
    fi
}

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $venv"
    run "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

torch_installed() {
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import torch" >/dev/null 2>&1
}
report_torch() {
    if [ "$dry_run" = 1 ] && ! torch_installed; then return 0; fi
    "$venv/bin/python" -c 'import torch
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
print(f"[setup] torch {torch.__version__} ({build}), CUDA available: {torch.cuda.is_available()}")'
}

if torch_installed; then
    echo "[setup] torch already installed, skipping it"
elif [ -n "${TORCH_SPEC:-}" ]; then
    echo "[setup] installing $TORCH_SPEC (TORCH_SPEC)"
    run "${pip[@]}" "$TORCH_SPEC"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing torch>=2.6 (CUDA build)"
    run "${pip[@]}" "torch>=2.6"
else
    echo "[setup] no NVIDIA GPU: installing the CPU build of $cpu_spec"
    if [ -z "$cpu_index" ]; then
        run "${pip[@]}" "$cpu_spec"
    elif ! run "${pip[@]}" --index-url "$cpu_index" --timeout 15 --retries 0 "$cpu_spec"; then
        echo "[setup] $cpu_index did not answer with $cpu_spec; trying the default index"
        run "${pip[@]}" "$cpu_spec"
    fi
fi

c_args=()
# the pins were taken on Python 3.11 (several need >= 3.11): an older Python resolves unpinned
if [ -n "$constraints" ] && ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "[setup] Python < 3.11: installing without the pins of $constraints"
    constraints=""
fi
if [ -n "$constraints" ]; then
    [ -f "$constraints" ] || { echo "[setup] constraints file $constraints not found" >&2; exit 1; }
    c_args=(-c "$constraints")
fi
echo "[setup] installing the project and its test tools${constraints:+ (pinned by $constraints)}"
run "${pip[@]}" ${c_args[@]+"${c_args[@]}"} -e "$root[dev]"
report_torch
