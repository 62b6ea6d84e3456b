#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, under 10 minutes: three parts in order, each under a timeout
#   1. the CUDA tests   pytest -m "cuda and not slow" tests                         TESTS_TIMEOUT (150 s)
#   2. the benchmark    bench/run.py "$@" -> bench/results/<device-slug>.json        BENCH_TIMEOUT (240 s)
#   3. an RL step       bench/gpu_rl_step.py: the FLUX.1 Fill config at reduced size with random weights;
#                       peak memory against rl.plan's prediction, the rollout / judge / update split
#                       -> bench/results/gpu_rl_step-<device-slug>-<date>.json      RL_TIMEOUT (180 s)
# and a log of all of it in bench/results/gpu_check-<device-slug>-<date>.log. A part that fails or runs out
# of time does not stop the next; the summary at the end gives each part's status and seconds, and the exit
# status is 0 only when all three passed. Extra arguments go to bench/run.py (e.g. --quick), GPU_RL_ARGS to
# bench/gpu_rl_step.py (e.g. "--image-size 256"); TESTS_MARK replaces the marker expression.
# diffusers must be importable: when it is not, DIFFUSERS_WHEEL=/path/to/diffusers-*.whl (or a single
# wheels/diffusers-*.whl in the checkout) is installed with pip --no-deps --no-index; otherwise it says how.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"
RL_TIMEOUT="${RL_TIMEOUT:-180}"
TESTS_MARK="${TESTS_MARK:-cuda and not slow}"   # slow: the two-GPU FSDP2 test (minutes; skipped on one GPU)

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')" || exit 1

if ! "$PY" -c "import diffusers" 2>/dev/null; then
    wheel="${DIFFUSERS_WHEEL:-}"
    if [ -z "$wheel" ]; then
        found=(wheels/diffusers-*.whl)
        if [ "${#found[@]}" -eq 1 ] && [ -f "${found[0]}" ]; then wheel="${found[0]}"; fi
    fi
    if [ -z "$wheel" ]; then
        {
            echo "diffusers is not installed: the FLUX.1 Fill pipelines, the toy model and most CUDA tests need it."
            echo "Carry its wheel to this machine (pure Python, e.g. diffusers-0.42.1-py3-none-any.whl, the version"
            echo "constraints.txt pins; 'pip download diffusers==0.42.1 --no-deps' fetches it) and install it:"
            echo "    $PY -m pip install --no-deps --no-index /path/to/diffusers-0.42.1-py3-none-any.whl"
            echo "or let this script do it: DIFFUSERS_WHEEL=/path/to/diffusers-*.whl bash bench/gpu_check.sh"
            echo "(a single wheels/diffusers-*.whl in the checkout is picked up without DIFFUSERS_WHEEL)."
        } >&2
        exit 2
    fi
    echo "diffusers is missing; installing the carried wheel:" >&2
    echo "    $PY -m pip install --no-deps --no-index $wheel" >&2
    "$PY" -m pip install --no-deps --no-index "$wheel" || exit 2
fi
# with --no-deps, what diffusers imports must already be there (transformers brings most of it)
"$PY" -c "from diffusers import FluxFillPipeline" || {
    echo "diffusers does not import: install the module named above (its wheel, with --no-deps too)" >&2
    exit 2
}

NAME="$("$PY" -c "import torch; print(torch.cuda.get_device_name())")"
SLUG="$("$PY" -c "from bench.device import slug; import sys; print(slug(sys.argv[1]))" "$NAME")"
DATE="$(date -u +%Y-%m-%d)"
LOG="bench/results/gpu_check-$SLUG-$DATE.log"
mkdir -p bench/results

versions() {
    "$PY" - <<'EOF'
import importlib.metadata as md
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "MISSING"
names = ("torch", "triton", "diffusers", "transformers", "peft", "pytest", "hypothesis", "pytest-timeout")
print("# " + "  ".join(f"{n} {version(n)}" for n in names))
EOF
}

SUMMARY=()
FAILED=0
part() {  # part NAME SECONDS COMMAND...: run it under a timeout; record its status and seconds
    local name="$1" limit="$2"
    shift 2
    echo
    echo "=== $name (timeout ${limit} s):$(printf " %q" "$@")"
    local start=$SECONDS rc status
    timeout --kill-after=15 "$limit" "$@"
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT after ${limit} s"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    SUMMARY+=("$(printf '%-14s %-26s %4d s' "$name" "$status" $((SECONDS - start)))")
}

main() {
    echo "# gpu_check on $NAME, $(date -u +%FT%TZ)"
    versions
    export PYTHONUNBUFFERED=1
    part "cuda tests" "$TESTS_TIMEOUT" "$PY" -m pytest -q -m "$TESTS_MARK" tests
    part "bench/run.py" "$BENCH_TIMEOUT" "$PY" bench/run.py "$@"
    # shellcheck disable=SC2086  # GPU_RL_ARGS is split into words on purpose
    part "gpu_rl_step" "$RL_TIMEOUT" "$PY" bench/gpu_rl_step.py ${GPU_RL_ARGS:-}
    echo
    echo "=== summary (time budget $((TESTS_TIMEOUT + BENCH_TIMEOUT + RL_TIMEOUT)) s)"
    printf '  %s\n' "${SUMMARY[@]}"
    echo "results:"
    local f
    for f in "bench/results/$SLUG.json" "bench/results/gpu_rl_step-$SLUG-$DATE.json" "$LOG"; do
        if [ -f "$f" ]; then echo "  $f"; else echo "  $f (not written)"; fi
    done
    echo "(commit bench/results/ to keep them)"
    return $FAILED
}

main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
