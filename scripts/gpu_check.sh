#!/usr/bin/env bash
# GPU check (issue 10): every command on --device cuda end to end, with a small timing report. About 5-8
# minutes on one H100-class GPU at the default scale; nothing here is a benchmark target.
#   1. 64x64 prior: phantoms (phase_retrieval n=64), a few hundred WGAN-GP steps on the device
#   2. 256x256 phase retrieval (configs/phase_retrieval_256.toml): a briefly trained 256x256 prior, one
#      simulated observation, a flow solve with a small budget
#   3. a batch of elliptic solves (configs/elliptic_demo.toml): simulate --n-obs, one stacked solve
# Usage:
#   scripts/gpu_check.sh                                  # one GPU, full size
#   GPU_CHECK_NPROC=2 scripts/gpu_check.sh                # trainings and the stacked solve under torchrun
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SCALE=tiny scripts/gpu_check.sh   # the same steps, CPU-sized (a minute or two)
# Output: $GPU_CHECK_OUT (default: $OUT when set, else runs/gpu_check) with logs and gpu_check_report.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_CHECK_DEVICE:-cuda}
SCALE=${GPU_CHECK_SCALE:-full}
NPROC=${GPU_CHECK_NPROC:-1}
DIR=${GPU_CHECK_OUT:-${OUT:-runs/gpu_check}}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
mkdir -p "$DIR"
REPORT="$DIR/gpu_check_report.txt"

case "$SCALE" in
    full)
        PRIOR_N=64; PRIOR_FIELDS=2000; PRIOR_STEPS=300; PRIOR_BATCH=64; PRIOR_BASE=32
        BIG_CONFIG=configs/phase_retrieval_256.toml; BIG_FIELDS=256; BIG_STEPS=20
        ELL_FIELDS=1000; ELL_STEPS=200; ELL_OBS=${GPU_CHECK_ELLIPTIC_OBS:-4}
        FLOW_ITER=300; FLOW_BATCH=64; N_SAMPLES=2000; MAP_ITER=100 ;;
    tiny)
        PRIOR_N=16; PRIOR_FIELDS=64; PRIOR_STEPS=4; PRIOR_BATCH=8; PRIOR_BASE=4
        BIG_CONFIG=configs/phase_retrieval_demo.toml; BIG_FIELDS=32; BIG_STEPS=2
        ELL_FIELDS=32; ELL_STEPS=2; ELL_OBS=${GPU_CHECK_ELLIPTIC_OBS:-2}
        FLOW_ITER=10; FLOW_BATCH=8; N_SAMPLES=64; MAP_ITER=10 ;;
    *) echo "GPU_CHECK_SCALE must be full or tiny, got '$SCALE'" >&2; exit 2 ;;
esac
case "$NPROC" in
    1) GANFLOW=("$PY" -m ganflow) ;;
    *) GANFLOW=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m ganflow) ;;
esac
ONE=("$PY" -m ganflow)  # commands that do not scale out (data, simulate)

{
    echo "ganflow GPU check: device=$DEVICE scale=$SCALE nproc=$NPROC date=$(date -u +%FT%TZ) host=$(hostname)"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices',
[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} > "$REPORT" 2>&1 || true

T_ALL=$(date +%s.%N)
step() {  # name cmd... : run, log to $DIR/<name>.log, append the wall time (and the last line) to the report
    local name=$1; shift
    local t0 t1
    t0=$(date +%s.%N)
    if ! "$@" > "$DIR/$name.log" 2>&1; then
        echo "FAILED $name (see $DIR/$name.log)" | tee -a "$REPORT" >&2
        tail -n 20 "$DIR/$name.log" >&2
        exit 1
    fi
    t1=$(date +%s.%N)
    printf '%-28s %8.1f s   %s\n' "$name" "$(awk "BEGIN{print $t1 - $t0}")" "$(grep -v '^\s*$' "$DIR/$name.log" | tail -n 1)" \
        | tee -a "$REPORT"
}

# Solve settings: a small flow budget, everything else at its defaults.
cat > "$DIR/solve_small.toml" <<EOF
[solve]
n_samples = $N_SAMPLES
n_quantile = $N_SAMPLES
batch_size = 250
[flow]
max_iter = $FLOW_ITER
min_iter = $FLOW_ITER
batch_size = $FLOW_BATCH
map_starts = 4
map_iter = $MAP_ITER
progress = false
EOF
cat > "$DIR/prior_small.toml" <<EOF
[train]
latent_dim = 64
batch_size = $PRIOR_BATCH
base_channels = $PRIOR_BASE
checkpoint_every_s = 120.0
EOF

# 1. a 64x64 prior on phantoms
step data_phantoms_${PRIOR_N} "${ONE[@]}" data --problem phase_retrieval --kw n=$PRIOR_N --n $PRIOR_FIELDS \
    --seed 0 -o "$DIR/phantoms.h5" --force
step train_prior_${PRIOR_N} "${GANFLOW[@]}" train-prior --data "$DIR/phantoms.h5" --config "$DIR/prior_small.toml" \
    --steps $PRIOR_STEPS --device "$DEVICE" --seed 0 -o "$DIR/prior_${PRIOR_N}.pt" --force --no-progress --no-report

# 2. phase retrieval at the config's size (256x256 at full scale)
step data_pr_big "${ONE[@]}" data --problem phase_retrieval --config "$BIG_CONFIG" --n $BIG_FIELDS --seed 0 \
    -o "$DIR/pr_big_fields.h5" --force
step train_prior_pr_big "${GANFLOW[@]}" train-prior --data "$DIR/pr_big_fields.h5" --config "$BIG_CONFIG" \
    --steps $BIG_STEPS --device "$DEVICE" --seed 0 -o "$DIR/pr_big_prior.pt" --force --no-progress --no-report
step simulate_pr_big "${ONE[@]}" simulate --problem phase_retrieval --config "$BIG_CONFIG" \
    --prior "$DIR/pr_big_prior.pt" --noise-sigma 0.01 --device "$DEVICE" --seed 1 -o "$DIR/pr_big_obs.h5" --force
step solve_pr_big "${ONE[@]}" solve --obs "$DIR/pr_big_obs.h5" --prior "$DIR/pr_big_prior.pt" \
    --config "$DIR/solve_small.toml" --device "$DEVICE" --seed 0 -o "$DIR/pr_big_posterior.h5" --force --quiet

# 3. a batch of elliptic solves (forward solves are sparse LU on the host; G and the flow loop as configured)
step data_elliptic "${ONE[@]}" data --problem elliptic --config configs/elliptic_demo.toml --n $ELL_FIELDS --seed 0 \
    -o "$DIR/elliptic_fields.h5" --force
step train_prior_elliptic "${GANFLOW[@]}" train-prior --data "$DIR/elliptic_fields.h5" \
    --config configs/elliptic_demo.toml --steps $ELL_STEPS --device "$DEVICE" --seed 0 -o "$DIR/elliptic_prior.pt" \
    --force --no-progress --no-report
step simulate_elliptic_x$ELL_OBS "${ONE[@]}" simulate --problem elliptic --config configs/elliptic_demo.toml \
    --prior "$DIR/elliptic_prior.pt" --noise-sigma 0.01 --n-obs $ELL_OBS --device "$DEVICE" --seed 2 \
    -o "$DIR/elliptic_obs.h5" --force
step solve_elliptic_x$ELL_OBS "${GANFLOW[@]}" solve --obs "$DIR/elliptic_obs.h5" --prior "$DIR/elliptic_prior.pt" \
    --config "$DIR/solve_small.toml" --device "$DEVICE" --seed 0 -o "$DIR/elliptic_posterior.h5" --force --quiet

printf '%-28s %8.1f s\n' total "$(awk "BEGIN{print $(date +%s.%N) - $T_ALL}")" | tee -a "$REPORT"
echo "report: $REPORT"
