#!/bin/sh
# Submission entry point: predicts every $INPUT_DIR/<case>_0000.nii.gz into
# $OUTPUT_DIR/<case>.nii.gz. The organizers run it once per case as
#   docker container run ... TEAM:latest /bin/bash -c "sh predict.sh"
# so everything here counts in the measured time: keep it a single Python start.
#
# Environment (defaults in brackets):
#   INPUT_DIR    [/workspace/inputs]
#   OUTPUT_DIR   [/workspace/outputs]
#   MODEL_DIR    [models/submission next to this script if present, else models/demo]
#                an nnU-Net v2 results folder (plans.json at its top), or a folder whose
#                sub-folders are model folders: those form an ensemble (logits averaged).
#   PYTHON       [python3]
#   PREDICT_ARGS extra arguments for `python -m inference` (e.g. "--device cpu").
#   OMP_NUM_THREADS [the number of usable cores, at most 8]
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
INPUT_DIR=${INPUT_DIR:-/workspace/inputs}
OUTPUT_DIR=${OUTPUT_DIR:-/workspace/outputs}
if [ -z "${MODEL_DIR:-}" ]; then
    if [ -d "$HERE/models/submission" ]; then
        MODEL_DIR="$HERE/models/submission"
    else
        MODEL_DIR="$HERE/models/demo"
    fi
fi
PYTHON=${PYTHON:-python3}

if [ -f "$MODEL_DIR/plans.json" ]; then
    set -- -m "$MODEL_DIR"
else
    set --
    for member in "$MODEL_DIR"/*/; do
        [ -f "${member}plans.json" ] && set -- "$@" -m "${member%/}"
    done
    if [ $# -eq 0 ]; then
        echo "error: MODEL_DIR $MODEL_DIR holds no plans.json and no model sub-folders" >&2
        exit 2
    fi
fi

# CPU threads for torch / OpenMP / BLAS: one per core the container may use, at most 8
# (a GPU run needs only a few for its CPU side, and a 64-core host would pay for starting
# and synchronising 64), unless the caller set them. A fixed count above the core count
# oversubscribes the cores of a small host (OpenMP threads spin while they wait).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS=$(nproc 2>/dev/null || echo 8)
    [ "$OMP_NUM_THREADS" -gt 8 ] && OMP_NUM_THREADS=8
fi
export OMP_NUM_THREADS
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}

# Lean start-up: no bytecode writes into a read-only image, memory returned to the
# device in whole segments (less fragmentation under the 4 GB budget).
export PYTHONDONTWRITEBYTECODE=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# Keep freed host memory in the heap: without this every CPU forward pass page-faults
# its activations back in; the free pages go back between cases (inference/runtime.py).
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-268435456}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

# shellcheck disable=SC2086 # PREDICT_ARGS is split into words on purpose
exec "$PYTHON" -m inference -i "$INPUT_DIR" -o "$OUTPUT_DIR" "$@" ${PREDICT_ARGS:-}
