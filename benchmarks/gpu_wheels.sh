#!/usr/bin/env bash
# What the GPU check carries to a machine without network (docs/gpu.md#the-gpu-check), into
# wheels/ (git-ignored), on a machine with network:
#   * the Python 3.12 x86-64 wheels of mpich (MPI and mpiexec), pytest-mpi and, as a fallback
#     for an mpi4py there that does not pair with MPICH, mpi4py;
#   * hpcopt's own wheel (the check builds hpcopt from the tree, this is its fallback);
#   * the MNIST t10k files, where they are found ($HPCOPT_DATA_DIR or ../shared/datasets), as
#     wheels/mnist (else the check trains on random images).
# Everything travels with the working tree, which may not exceed 64 MiB: the total is printed.
#
#   bash benchmarks/gpu_wheels.sh            # PYTHON (default .venv/bin/python or python3), WHEELS
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
WHEELS=${WHEELS:-$REPO/wheels}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
# The GPU machine's interpreter: CPython 3.12 on x86-64 Linux.  pip matches manylinux_2_N tags
# exactly, so the usual ones are named (the mpich wheel is manylinux_2_28).
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
    manylinux_2_5_x86_64 manylinux1_x86_64)
PINS=${GPU_WHEELS:-mpich pytest-mpi mpi4py}

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
platform_flags=()
for p in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$p"); done
# One version of each: two would stop the install there.
# shellcheck disable=SC2086
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_flags[@]}" -d "$WHEELS" $PINS
# hpcopt itself: a pure-Python wheel, built from a copy so that build/ stays out of the tree.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./wheels --exclude=./.whl --exclude=./build \
    --exclude='*.egg-info' --exclude=./runs --exclude='__pycache__' --exclude='*.h5' -cf - . | tar -C "$build" -xf -
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --no-index -w "$WHEELS" "$build" >/dev/null

data=""
for candidate in "${HPCOPT_DATA_DIR:-}" "$REPO/../shared/datasets"; do
    for folder in "$candidate" "$candidate/mnist"; do
        if [[ -n $candidate && -e $folder/t10k-images-idx3-ubyte.gz || -n $candidate && -e $folder/t10k-images-idx3-ubyte ]]; then
            data=$folder
            break 2
        fi
    done
done
if [[ -n $data ]]; then
    mkdir -p "$WHEELS/mnist"
    cp "$data"/t10k-* "$WHEELS/mnist/"
else
    echo "MNIST not found (HPCOPT_DATA_DIR, ../shared/datasets): the check will train on random images"
fi

ls -l "$WHEELS" "$WHEELS"/mnist 2>/dev/null | grep -v '^total'
carried=$(du -sb "$WHEELS" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
echo "wheels/: $((carried / 1024)) KiB; with the working tree: $(((carried + tree) / 1024 / 1024)) MiB of the 64 MiB a call may carry"
