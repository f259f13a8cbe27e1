#!/usr/bin/env bash
# Recipe for the bundled demo priors, one command each:
#   scripts/train_demo_priors.sh elliptic          -> runs/demo_priors/elliptic_32.pt         (configs/elliptic_demo.toml)
#   scripts/train_demo_priors.sh phase_retrieval   -> runs/demo_priors/phase_retrieval_32.pt  (configs/phase_retrieval_demo.toml)
#   scripts/train_demo_priors.sh all               both, side by side with one thread each
# A single problem trains with two threads (THREADS=n to change): run it alone on a 2-core machine.
# Each: `ganflow data` (4000 example fields, seed 0), then `ganflow train-prior` with the config's [train] table
# (the quality report and the representation-error statistics are written at the end). An interrupted run
# continues with RESUME=1. Copy the result to problems/data/ to bundle it.
#   OUT=dir STEPS=n RESUME=1 scripts/train_demo_priors.sh PROBLEM
set -euo pipefail
WHICH=${1:-all}
OUT=${OUT:-runs/demo_priors}
GANFLOW=${GANFLOW:-.venv/bin/ganflow}
mkdir -p "$OUT"
train() {  # problem
    local problem=$1 config="configs/${1}_demo.toml" stem="${1}_32"
    if [ ! -f "$OUT/${stem}_fields.h5" ]; then
        OMP_NUM_THREADS=1 "$GANFLOW" data --problem "$problem" --config "$config" --n 4000 --seed 0 \
            -o "$OUT/${stem}_fields.h5"
    fi
    OMP_NUM_THREADS=${THREADS:-2} "$GANFLOW" train-prior --data "$OUT/${stem}_fields.h5" --config "$config" \
        --seed 0 -o "$OUT/${stem}.pt" ${STEPS:+--steps $STEPS} ${RESUME:+--resume} --no-progress
}
case "$WHICH" in
    elliptic|phase_retrieval) train "$WHICH" ;;
    all)  # one thread each, side by side
        export THREADS=${THREADS:-1}
        train phase_retrieval > "$OUT/phase_retrieval_32.log" 2>&1 &
        train elliptic > "$OUT/elliptic_32.log" 2>&1 &
        wait ;;
    *) echo "usage: $0 elliptic|phase_retrieval|all" >&2; exit 2 ;;
esac
