#!/bin/bash
# A short leased-GPU check of the fused routing kernels alone: CUDA correctness, the tile sweep
# (plain routing as the baseline, same process), then `capsbench speed` fused vs plain.
# Usage: OUT=<folder> DATA=<data root> bash tests/benchmarks/gpu_routing.sh
set -u
export PYTHONUNBUFFERED=1 CAPSBENCH_DATA=${DATA:-$PWD/.devdata} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 )) s] $*"; }
python3 -c "import torch, triton; print('torch', torch.__version__, torch.cuda.get_device_name(), 'triton', triton.__version__)"
el "1. fused routing on CUDA vs the literal procedure"
timeout ${T_TESTS:-60} python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu --tb=short tests/test_fused_routing.py 2>&1 | tail -40
el "2. routing fwd+bwd: plain vs fused per tile configuration"
timeout ${T_TILES:-80} python3 tests/benchmarks/routing_tiles.py --batch-sizes 128,512 --profile \
  --out $OUT/routing_tiles.csv 2>&1 | tee /tmp/tiles.log | grep -v "^capsbench: warning\|Warning\|_warn_once"
BEST=$(grep '^BEST ' /tmp/tiles.log | awk '{print $2}')
[ -n "$BEST" ] && export CAPSBENCH_ROUTING_TILES=$BEST && el "tiles $BEST"
el "3. capsbench speed, fused then plain"
for R in triton torch; do
  timeout ${T_SPEED:-45} python3 -m capsbench speed --device cuda --routing $R --variants bf16_cl,bf16_cl_graph \
    --batch-sizes 128,512 --budget 0.5 --infer-batch 4096 --out /tmp/sp_$R 2>&1 | grep -v "^capsbench: warning\|^model="
  cp /tmp/sp_$R/speed-cuda/results.csv $OUT/speed_$R.csv 2>/dev/null
done
el done
