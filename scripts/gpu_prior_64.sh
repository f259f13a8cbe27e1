#!/usr/bin/env bash
# A 64x64 phantom prior on one GPU with configs/prior_gpu_64.toml (issue 14, item 6), measured like the bundled
# priors: 4,000 training fields (seed 0), 2,000 fresh fields from the sampler (seed 777, never trained on), then
# `ganflow prior-report` against the fresh fields.
#   scripts/gpu_prior_64.sh                         # the config's steps
#   TRAIN_S=330 scripts/gpu_prior_64.sh             # fit the run into a wall-clock budget (a short lease)
#   DEVICE=cpu N=16 FIELDS=64 TRAIN_S=20 scripts/gpu_prior_64.sh   # the same steps, CPU-sized (a check)
# With TRAIN_S, a 200-step probe at constant rates measures the steps/s, and the run is resumed to the steps that
# fit, with the config's annealing phase (and clip) scaled to the same share of the run.
# Output: $DIR (default: $OUT when set, else runs/gpu_prior_64): prior.pt, its report (.h5/.png), logs, summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
N=${N:-64}
FIELDS=${FIELDS:-4000}
CONFIG=${CONFIG:-configs/prior_gpu_64.toml}
DIR=${DIR:-${OUT:-runs/gpu_prior_64}}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
G=("$PY" -m ganflow)
trap 'echo "failed; the last lines of the logs in $DIR:" >&2; tail -n 5 "$DIR"/*.log >&2' ERR
mkdir -p "$DIR"
SUMMARY="$DIR/summary.txt"
: > "$SUMMARY"

"${G[@]}" data --problem "${PROBLEM:-phase_retrieval}" --kw n="$N" --n "$FIELDS" --seed 0 -o "$DIR/train.h5" --force
"${G[@]}" data --problem "${PROBLEM:-phase_retrieval}" --kw n="$N" --n $((FIELDS / 2)) --seed 777 -o "$DIR/fresh.h5" --force

config_with() {  # anneal_steps clamp -> a copy of $CONFIG with those two [train] keys replaced
    sed -e "s/^anneal_steps *=.*/anneal_steps = $1/" -e "s/^clamp *=.*/clamp = \"$2\"/" "$CONFIG" > "$DIR/run.toml"
}
key() { sed -n "s/^$1 *= *\([0-9.e+-]*\).*/\1/p" "$CONFIG"; }
STEPS=$(key steps)
ANNEAL=$(key anneal_steps)
TRAIN=("${G[@]}" train-prior --data "$DIR/train.h5" -o "$DIR/prior.pt" --device "$DEVICE" --seed 0 --no-progress)

t0=$(date +%s.%N)
if [ -n "${TRAIN_S:-}" ]; then
    PROBE=200
    config_with 0 off
    "${TRAIN[@]}" --config "$DIR/run.toml" --steps $PROBE --force --no-report > "$DIR/probe.log" 2>&1
    t1=$(date +%s.%N)
    RATE=$(awk "BEGIN{print $PROBE / ($t1 - $t0)}")
    STEPS=$(awk "BEGIN{s = int($PROBE + $RATE * ($TRAIN_S - ($t1 - $t0))); m = $PROBE + 10; s = (s < m ? m : s); print (s < $STEPS ? s : $STEPS)}")
    ANNEAL=$(awk "BEGIN{print int($ANNEAL * $STEPS / $(key steps))}")
    echo "probe: $PROBE steps at $RATE steps/s (start-up included); running to $STEPS steps, $ANNEAL annealed" \
        | tee -a "$SUMMARY"
    config_with "$ANNEAL" anneal
    "${TRAIN[@]}" --config "$DIR/run.toml" --steps "$STEPS" --resume > "$DIR/train.log" 2>&1
else
    "${TRAIN[@]}" --config "$CONFIG" --force > "$DIR/train.log" 2>&1
fi
t2=$(date +%s.%N)
echo "trained $STEPS steps in $(awk "BEGIN{print $t2 - $t0}") s on $DEVICE: \
$(awk "BEGIN{print $STEPS / ($t2 - $t0)}") steps/s (data loading and the end-of-run report included)" | tee -a "$SUMMARY"
"${G[@]}" prior-report "$DIR/prior.pt" --data "$DIR/fresh.h5" -o "$DIR/prior_fresh" --force \
    2>&1 | tee -a "$SUMMARY"
