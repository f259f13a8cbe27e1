#!/usr/bin/env bash
# Recipe for the two bundled demo priors (committed under problems/data/):
#   problems/data/phase_retrieval_32.pt   32x32 phantoms   (configs/phase_retrieval_demo.toml)
#   problems/data/elliptic_32.pt          32x32 channels   (configs/elliptic_demo.toml)
# Each: `ganflow data` (4000 example fields, seed 0) then `ganflow train-prior` with the config's [train] table.
# On the 2-core CPU the two trainings run side by side with one thread each (the most efficient split there).
#   scripts/train_demo_priors.sh [OUT_DIR] [STEPS]
set -euo pipefail
OUT=${1:-runs/demo_priors}
STEPS=${2:-}
GANFLOW=${GANFLOW:-.venv/bin/ganflow}
mkdir -p "$OUT"
train() {  # problem config stem
    local problem=$1 config=$2 stem=$3
    OMP_NUM_THREADS=1 "$GANFLOW" data --problem "$problem" --config "$config" --n 4000 --seed 0 \
        -o "$OUT/${stem}_fields.h5" --force
    OMP_NUM_THREADS=1 "$GANFLOW" train-prior --data "$OUT/${stem}_fields.h5" --config "$config" --seed 0 \
        -o "$OUT/${stem}.pt" ${STEPS:+--steps $STEPS} --force
}
train phase_retrieval configs/phase_retrieval_demo.toml phase_retrieval_32 > "$OUT/phase_retrieval_32.log" 2>&1 &
train elliptic configs/elliptic_demo.toml elliptic_32 > "$OUT/elliptic_32.log" 2>&1 &
wait
echo "trained: $OUT/phase_retrieval_32.pt $OUT/elliptic_32.pt (copy them to problems/data/ to bundle)"
