#!/usr/bin/env bash
# Recipe: example fields -> WGAN-GP prior for the elliptic problem.
#   scripts/train_elliptic_prior.sh [CONFIG] [N_FIELDS] [OUT_DIR] [SEED]
# Defaults: configs/elliptic_demo.toml, 4000 fields, elliptic_output/, seed 0. Extra train-prior options
# (e.g. --device cuda, --resume, --steps 100) go in TRAIN_ARGS: TRAIN_ARGS="--device cuda" scripts/...
set -euo pipefail
CONFIG=${1:-configs/elliptic_demo.toml}
N_FIELDS=${2:-4000}
OUT_DIR=${3:-elliptic_output}
SEED=${4:-0}
# The project's virtualenv when present (make setup), else ganflow on PATH; GANFLOW=... overrides.
if [ -z "${GANFLOW:-}" ]; then
    if [ -x .venv/bin/ganflow ]; then GANFLOW=.venv/bin/ganflow; else GANFLOW=ganflow; fi
fi
STEM=$(basename "$CONFIG" .toml)
mkdir -p "$OUT_DIR"
"$GANFLOW" check-operator elliptic --seed "$SEED" --batch 2       # the adjoint gradient first, as hIPPYlib does
"$GANFLOW" data --problem elliptic --config "$CONFIG" --n "$N_FIELDS" --seed "$SEED" \
    -o "$OUT_DIR/${STEM}_fields.h5" --force
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of options on purpose
"$GANFLOW" train-prior --data "$OUT_DIR/${STEM}_fields.h5" --config "$CONFIG" --seed "$SEED" \
    -o "$OUT_DIR/${STEM}_prior.pt" ${TRAIN_ARGS:-}
