#!/usr/bin/env bash
# The GPU check: one command that measures on a GPU machine what docs/gpu.md lists as not
# measured, and on a machine without a GPU dry-runs what the CPU can do (then exits 0 if
# that passed).  How to run it on the lent GPU machine: docs/gpu.md#the-gpu-check.
#
#   bash benchmarks/gpu_check.sh                 # or: make gpu-check
#
# On a GPU (torch sees one):
#   1. install: the carried wheels (wheels/, from benchmarks/gpu_wheels.sh: mpich, pytest-mpi)
#      and hpcopt from a copy of this tree, `pip install --no-index --no-deps`, no network;
#   2. env: GPU, driver, torch/CuPy/MPI versions, whether MPI claims CUDA support;
#   3. the 2-rank CPU reference runs start in the background (own cores, own time limits);
#   4. tests: tests/kernels/test_kernels.py, test_kernel_wiring.py, tests/training/test_device.py,
#      then the mpi-marked device tests under mpiexec -n 2;
#   5. benchmarks/kernels.py at 1e6, 1e7, 1e8 (float32 and float64) on the GPU;
#   6. 2 ranks on the one GPU: APTS-D and HF on MNIST, `cnn` at batch 2000 (step time vs the
#      CPU runs) and `cnn-small` with TF32 off (losses vs the CPU runs), staged collectives,
#      and direct ones where MPI claims CUDA support;
#   7. benchmarks/hvp_cost.py on the GPU: mlp, cnn-small, cnn at batch 256 and 2000; then the
#      allreduce of CPU and GPU tensors on 2 ranks: staged, and direct where MPI is CUDA-aware;
#   8. summary: every figure in $OUT/gpu_check.json, the goals, a table.
# Each step has its own time limit, and all of them together stay inside GPU_CHECK_BUDGET
# seconds (default 450): a step that would start later is skipped, and says so.
#
# Environment: OUT (default: a new temporary directory), PYTHON (default: .venv/bin/python
# where it exists, else python3), WHEELS (default: wheels/), GPU_CHECK_MODE=auto|gpu|dry
# (auto: gpu where torch sees a GPU), GPU_CHECK_INSTALL=auto|0|1 (auto: install on a GPU only;
# into a venv under the work folder when PYTHON lies inside this tree), GPU_CHECK_BUDGET,
# HPCOPT_DATA_DIR (MNIST; else wheels/mnist, else ../shared/datasets, else random images).
#
# $OUT receives three files (the GPU machine returns at most eight): gpu_check.json (every
# figure), gpu_check.log (this output and every step's log) and gpu_check_files.tar.gz (run
# logs, junit files, the JSON of each step).  Exit status: 0 when every step that ran passed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
T0=$(date +%s.%N)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/hpcopt-gpu-check.XXXXXX")}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hpcopt-gpu-work.XXXXXX")
mkdir -p "$WORK/logs" "$WORK/json" "$WORK/runs"
: >"$WORK/steps.tsv"
: >"$WORK/console.log"
WHEELS=${WHEELS:-$REPO/wheels}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
MODE=${GPU_CHECK_MODE:-auto}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

say() { echo "$*" | tee -a "$WORK/console.log"; }
elapsed() { awk -v t0="$T0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%d", t1 - t0 }'; }

# The full log: this script's lines, then every step's log in the order the steps started.
assemble_log() {
    {
        cat "$WORK/console.log"
        local log
        while IFS= read -r log; do
            printf '\n===== %s =====\n' "$(basename "$log" .log)"
            cat "$log"
        done < <(ls -1tr "$WORK"/logs/*.log 2>/dev/null)
    } >"$OUT/gpu_check.log"
}

summary() {  # summary [--quiet]: (re)write $OUT/gpu_check.json; the last one prints the tables
    "$PY" benchmarks/gpu_check.py summary --work "$WORK" --out "$OUT/gpu_check.json" --mode "$MODE" \
        --reason "$REASON" --started "$STARTED" --t0 "$T0" "$@" >>"$WORK/console.log" 2>&1 || true
}

# What $OUT holds so far, in case the whole command is stopped before its end.
checkpoint() {
    summary --quiet
    assemble_log
}

# step NAME LIMIT_S COMMAND...: run COMMAND with a time limit (cut to what the budget has left),
# its output in logs/NAME.log; one line per step in steps.tsv; on failure, the log's tail.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - $(elapsed)))
    if ((left < 10)); then
        say "== $name: skipped (the check's ${BUDGET} s budget is spent)"
        printf '%s\tskipped\t-\t0\tbudget spent\n' "$name" >>"$WORK/steps.tsv"
        return 0
    fi
    ((limit > left)) && limit=$left
    say "== $name (limit ${limit} s)"
    local start rc seconds status note=""
    start=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" </dev/null >"$WORK/logs/$name.log" 2>&1
    rc=$?
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout note="limit ${limit} s" ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$note" >>"$WORK/steps.tsv"
    say "   $name: $status (rc $rc, $seconds s)"
    if [[ $status != ok ]]; then
        tail -n 25 "$WORK/logs/$name.log" | sed 's/^/   | /' | tee -a "$WORK/console.log"
    fi
    return 0
}

# train NAME DEVICE MODEL OPTIMIZER STEPS LIMIT [VAR=VALUE...]: 2 ranks of `hpcopt train` on MNIST.
train() {
    local name=$1 device=$2 model=$3 optimizer=$4 steps=$5 limit=$6
    shift 6
    # The loss-agreement runs (cnn-small) of APTS-D use the Euclidean norm: in Adam's metric, its
    # default, the CUDA kernels' float64 reductions alone move a step by 1e-3
    # (tests/kernels/test_kernel_wiring.py), which would compare reduction precisions, not devices.
    local options=()
    if [[ $optimizer == apts-d && $model == cnn-small ]]; then options=(--set metric=euclidean); fi
    step "train_$name" "$limit" env "$@" "$MPIEXEC" -n 2 "$PY" -m mpi4py -m hpcopt train --problem mnist \
        --data-dir "$DATA" --model "$model" --optimizer "$optimizer" --batch-size "$BATCH" --max-steps "$steps" \
        --device "$device" --seed 0 --threads 1 --out "$WORK/runs/$name.h5" --overwrite "${options[@]}"
}

# -- which check ------------------------------------------------------------------------------
PY=$PYTHON
REASON="GPU_CHECK_MODE=$MODE"
if [[ $MODE == auto ]]; then
    if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        MODE=gpu
        REASON="torch sees a GPU"
    else
        MODE=dry
        gpus=$(nvidia-smi -L 2>/dev/null | head -1)
        REASON="no GPU: torch.cuda.is_available() is False (nvidia-smi: ${gpus:-none})"
    fi
fi
if [[ $MODE == gpu ]]; then
    BUDGET=${GPU_CHECK_BUDGET:-450}
else
    MODE=dry
    BUDGET=${GPU_CHECK_BUDGET:-240}
fi
say "gpu_check: $REASON; mode $MODE, budget ${BUDGET} s; results in $OUT"
if [[ $MODE == dry ]]; then
    say "gpu_check: no GPU figure is measured here: dry run of the steps the CPU can do"
fi
say "gpu_check: tree $REPO, python $PYTHON, wheels $WHEELS, started $STARTED"

# -- 1. install --------------------------------------------------------------------------------
INSTALL=${GPU_CHECK_INSTALL:-auto}
if [[ $INSTALL == 1 || ($INSTALL == auto && $MODE == gpu) ]]; then
    # Into the interpreter's own environment (the GPU machine's, discarded afterwards), except
    # for an interpreter inside this tree (a developer's .venv): then into a venv beside it.
    target=image
    [[ $PYTHON == "$REPO"/* ]] && target=venv
    step install 150 "$PYTHON" benchmarks/gpu_check.py install --python "$PYTHON" --target "$target" \
        --wheels "$WHEELS" --work "$WORK" --json "$WORK/json/install.json"
    installed=$(tail -n 1 "$WORK/logs/install.log")
    if [[ -x $installed ]]; then PY=$installed; fi
else
    say "== install: skipped (GPU_CHECK_INSTALL=$INSTALL, mode $MODE; GPU_CHECK_INSTALL=1 installs in a dry run too)"
    printf 'install\tskipped\t-\t0\tGPU_CHECK_INSTALL=%s\n' "$INSTALL" >>"$WORK/steps.tsv"
fi
# mpiexec of the MPICH wheel: in the scripts folder of the interpreter's environment.
MPIEXEC=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/mpiexec
say "gpu_check: python $PY, mpiexec $MPIEXEC"

# -- 2. environment and data ---------------------------------------------------------------------
# From the work folder, so that the installed hpcopt (not the tree) is the one imported.
step env 60 bash -c 'cd "$1" && shift && "$@"' _ "$WORK" "$PY" "$REPO/benchmarks/gpu_check.py" env \
    --json "$WORK/json/env.json"
step data 60 "$PY" benchmarks/gpu_check.py data --work "$WORK/data" --json "$WORK/json/data.json"
DATA=$(tail -n 1 "$WORK/logs/data.log")
# Whether MPI itself claims CUDA support (HPCOPT_CUDA_AWARE aside): then the direct runs too.
AWARE=$("$PY" -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["mpi"]["cuda_aware_library"] is True))' \
    "$WORK/json/env.json" 2>/dev/null || echo 0)
checkpoint

if [[ $MODE == gpu ]]; then
    BATCH=2000
    # -- 3. CPU reference runs, in the background: 2 ranks, one core each -------------------------
    (
        train cnn_apts-d_cpu cpu cnn apts-d 3 200
        train cnn_hf_cpu cpu cnn hf 3 200
        train cnn-small_apts-d_cpu cpu cnn-small apts-d 3 90
        train cnn-small_hf_cpu cpu cnn-small hf 3 90
    ) &
    BACKGROUND=$!
    # -- 4. tests ---------------------------------------------------------------------------------
    step tests 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts= -rfEs --junitxml="$WORK/junit_tests.xml" \
        tests/kernels/test_kernels.py tests/kernels/test_kernel_wiring.py tests/training/test_device.py
    step tests_mpi 90 "$MPIEXEC" -n 2 bash -c 'exec "$@" --junitxml="$0.${PMI_RANK:-0}.xml"' "$WORK/junit_mpi" \
        "$PY" -m pytest -q -p no:cacheprovider -o addopts= -rfEs --with-mpi -m mpi tests/training/test_device.py
    checkpoint
    # -- 5. kernel bandwidth -----------------------------------------------------------------------
    for dtype in float32 float64; do
        step "kernels_$dtype" 90 "$PY" benchmarks/kernels.py --device cuda --sizes 1e6,1e7,1e8 --repeats 20 \
            --dtype "$dtype" --json "$WORK/json/kernels_$dtype.json"
    done
    # -- 6. GPU training runs (before the slower benchmarks: they feed two goals) -------------------
    # Step time: torch's defaults (cuDNN may use TF32).  Agreement: TF32 off, and cnn-small,
    # which has no dropout: the CPU and CUDA generators draw different dropout masks for cnn.
    train cnn_apts-d_cuda-staged cuda cnn apts-d 3 120 HPCOPT_CUDA_AWARE=0
    train cnn_hf_cuda-staged cuda cnn hf 3 120 HPCOPT_CUDA_AWARE=0
    train cnn-small_apts-d_cuda-staged cuda cnn-small apts-d 3 90 HPCOPT_CUDA_AWARE=0 NVIDIA_TF32_OVERRIDE=0
    train cnn-small_hf_cuda-staged cuda cnn-small hf 3 90 HPCOPT_CUDA_AWARE=0 NVIDIA_TF32_OVERRIDE=0
    if [[ $AWARE == 1 ]]; then
        train cnn_apts-d_cuda-direct cuda cnn apts-d 3 120 HPCOPT_CUDA_AWARE=1
        train cnn_hf_cuda-direct cuda cnn hf 3 120 HPCOPT_CUDA_AWARE=1
        train cnn-small_apts-d_cuda-direct cuda cnn-small apts-d 3 90 HPCOPT_CUDA_AWARE=1 NVIDIA_TF32_OVERRIDE=0
        train cnn-small_hf_cuda-direct cuda cnn-small hf 3 90 HPCOPT_CUDA_AWARE=1 NVIDIA_TF32_OVERRIDE=0
    else
        say "== direct collectives: skipped (MPI does not claim CUDA support; every GPU run above staged)"
    fi
    checkpoint
    # -- 7. curvature products and collectives -----------------------------------------------------
    step hvp 150 "$PY" benchmarks/hvp_cost.py --device cuda --models mlp,cnn-small,cnn --batch 256,2000 \
        --repeats 5 --products 10 --json "$WORK/json/hvp.json"
    step collectives 60 "$MPIEXEC" -n 2 "$PY" benchmarks/gpu_check.py collectives --device cuda \
        --sizes 1e3,1e5,390859,1e7 --json "$WORK/json/collectives.json"
    checkpoint
    say "== waiting for the CPU reference runs"
    wait "$BACKGROUND"
else
    BATCH=200
    # The CPU side of every step, small: compile-check of the .cu files (nvcc, where present)
    # and the twins' tests (the wiring and device tests run in the suite); tiny benchmarks; the
    # collectives, staged and direct, on host tensors; one step of APTS-D and HF on 2 ranks.
    step tests 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts= -rfE --junitxml="$WORK/junit_tests.xml" \
        tests/kernels/test_kernels.py
    step kernels_float32 60 "$PY" benchmarks/kernels.py --device cpu --sizes 1e3,1e4 --repeats 3 --dtype float32 \
        --json "$WORK/json/kernels_float32.json"
    step hvp 60 "$PY" benchmarks/hvp_cost.py --device cpu --models mlp --batch 16 --repeats 1 --products 2 \
        --no-linearize --json "$WORK/json/hvp.json"
    step collectives 60 "$MPIEXEC" -n 2 "$PY" benchmarks/gpu_check.py collectives --device cpu --sizes 1e3,1e5 \
        --repeats 3 --json "$WORK/json/collectives.json"
    train cnn-small_apts-d_cpu cpu cnn-small apts-d 1 90
    train cnn-small_hf_cpu cpu cnn-small hf 1 90
fi
printf '{"batch_size": %s, "ranks": 2, "data": "%s", "cuda_aware_library": %s}\n' "$BATCH" "$DATA" \
    "$([[ $AWARE == 1 ]] && echo true || echo false)" >"$WORK/json/training.json"

# -- 8. summary ------------------------------------------------------------------------------------
say "gpu_check: done in $(elapsed) s"
summary
assemble_log
tar -C "$WORK" -czf "$OUT/gpu_check_files.tar.gz" logs json runs $(cd "$WORK" && ls junit_*.xml 2>/dev/null) \
    2>/dev/null || true
# The summary tables (the end of the log) are what the caller sees; if the summary broke, its error.
if grep -q '===== GPU check summary' "$WORK/console.log"; then
    sed -n '/===== GPU check summary/,$p' "$WORK/console.log"
else
    echo "gpu_check: the summary failed:"
    tail -n 30 "$WORK/console.log"
fi
if [[ $MODE == dry ]]; then
    echo "gpu_check: $REASON; dry run done, every figure above is from the CPU"
fi
echo "gpu_check: $OUT/gpu_check.json, $OUT/gpu_check.log, $OUT/gpu_check_files.tar.gz"
if cut -f2 "$WORK/steps.tsv" | grep -qE '^(failed|timeout)$'; then
    echo "gpu_check: some steps failed (see the table above and gpu_check.log)"
    exit 1
fi
rm -rf "$WORK"
exit 0
