#!/bin/bash
# Paper-scale verdicts on one leased GPU in one call (issue: paper-scale results on one GPU).
# Run from the repository root on the device machine:
#   OUT=<results folder> DATA=<data root> bash tests/benchmarks/gpu_paper.sh
# Stages, each with its own timeout so that one slow stage cannot eat the next one's time; the
# whole script stays under TOTAL seconds (default 570):
#   1. the CUDA tests;
#   2. capsbench speed: the fused Triton routing against the plain path (u_hat + routing share);
#   3. every training job of the three claims, in parallel on the one GPU: capsnet and
#      cnn_maxpool x SEEDS seeds x {upright 28x28 (rotation, part_shuffle), random 40x40 canvas
#      (affnist, stopped at MATCH on *validation* digits)}, EPOCHS epochs (default: the profile's);
#   4. capsbench run for rotation, part_shuffle and affnist (reusing those jobs: same keys), then
#      the report, and everything copied under $OUT.
# CPU dry run (checks every command and path, minutes): PROFILE=smoke DEVICE=cpu EPOCHS=0.01 \
#   MATCH=0.2 SEEDS=2 OUT=/tmp/gp DATA=../shared/data bash tests/benchmarks/gpu_paper.sh
set -u
OUT=${OUT:?set OUT}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CAPSBENCH_DATA=${DATA:-$PWD/.devdata} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PROFILE=${PROFILE:-paper}; DEVICE=${DEVICE:-cuda}; SEEDS=${SEEDS:-3}; MATCH=${MATCH:-0.9922}
MODELS="capsnet cnn_maxpool"; RUNS=${RUNS:-/tmp/gp_runs}
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( ${TOTAL:-570} - ($(date +%s) - T0) )); }
CB="python3 -m capsbench"
if [ "$DEVICE" = cuda ]; then
  FAST="--amp bf16 --channels-last --cuda-graph"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
else
  FAST=""
fi
EPOCHS_ARG=${EPOCHS:+--epochs $EPOCHS}

el "1. CUDA tests"
if [ "$DEVICE" = cuda ]; then
  timeout ${T_TESTS:-80} python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu --tb=short \
    tests/test_fused_routing.py tests/test_speed.py 2>&1 | tail -15 | tee "$OUT/cuda_tests.txt"
fi

el "2. routing: fused (triton) vs plain (torch), bf16 training step"
if [ "$DEVICE" = cuda ]; then
  for R in triton torch; do
    timeout ${T_SPEED:-45} $CB speed --device cuda --routing $R --variants bf16_cl_graph --batch-sizes 128,512 \
      --budget 1 --out /tmp/gp_speed_$R 2>&1 | grep -v "^capsbench: warning" | tail -8
    cp /tmp/gp_speed_$R/speed-cuda/results.csv "$OUT/speed_$R.csv" 2>/dev/null
  done
fi

el "3. training jobs in parallel: $MODELS x $SEEDS seeds x 2 protocols, profile $PROFILE ${EPOCHS:+($EPOCHS epochs)}"
TT=$(( $(left) - ${T_EVAL:-150} ))
pids=()
for M in $MODELS; do
  for S in $(seq 0 $(( SEEDS - 1 ))); do
    timeout $TT $CB train --model $M --seed $S --profile $PROFILE --device $DEVICE $FAST $EPOCHS_ARG \
      --out $RUNS --no-progress > "$OUT/train_${M}_mnist28_s$S.log" 2>&1 &
    pids+=($!)
    timeout $TT $CB train --model $M --seed $S --profile $PROFILE --device $DEVICE $FAST $EPOCHS_ARG \
      --protocol canvas40_random --match-accuracy $MATCH --curve \
      --out $RUNS --no-progress > "$OUT/train_${M}_canvas40_s$S.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait $p; done
grep -h "accuracy\|Error\|error" "$OUT"/train_*.log | grep -v "^capsbench: warning" | head -40

el "4. suites (reusing the jobs), report"
COMMON="--profile $PROFILE --device $DEVICE --seeds $SEEDS --models capsnet,cnn_maxpool --out $RUNS --no-report --no-progress $FAST $EPOCHS_ARG"
for SUITE in rotation part_shuffle; do
  timeout $(( $(left) - 40 )) $CB run --suite $SUITE $COMMON 2>&1 | grep -v "^  \|^capsbench: warning" | tail -4
done
timeout $(( $(left) - 30 )) $CB run --suite affnist --match-accuracy $MATCH $COMMON 2>&1 \
  | grep -v "^  \|^capsbench: warning" | tail -4
timeout $(( $(left) - 5 )) $CB report $RUNS/rotation-$PROFILE $RUNS/part_shuffle-$PROFILE $RUNS/affnist-$PROFILE \
  -o "$OUT/report" 2>&1 | tail -3
for SUITE in rotation part_shuffle affnist; do
  mkdir -p "$OUT/runs/$SUITE"
  cp $RUNS/$SUITE-$PROFILE/results.csv $RUNS/$SUITE-$PROFILE/run.json "$OUT/runs/$SUITE/" 2>/dev/null
done
mkdir -p "$OUT/jobs"
for J in $RUNS/jobs/*/; do cp "$J/job.json" "$OUT/jobs/$(basename $J).json" 2>/dev/null; done
el done
