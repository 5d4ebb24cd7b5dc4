#!/bin/bash
# One leased-GPU session for issue #6 (speed), run from the repository root on the device
# machine: CUDA correctness (fused routing included), the routing tile sweep, `capsbench speed`
# with the fused and the plain routing, then the paper protocol (capsnet, --profile paper) for
# as many epochs as the remaining time allows, with its learning curve.
# Usage: OUT=<folder for results> DATA=<data root> bash tests/benchmarks/gpu_session.sh
# Every stage has its own timeout so one slow stage cannot eat the next one's time; the whole
# script stays under TOTAL seconds (default 570).
set -u
export PYTHONUNBUFFERED=1 CAPSBENCH_DATA=${DATA:-$PWD/.devdata} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( ${TOTAL:-570} - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'triton', triton.__version__)"

el "1. CUDA correctness tests"
timeout ${T_TESTS:-110} python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu --tb=short \
  tests/test_fused_routing.py tests/test_speed.py tests/test_transforms.py 2>&1 | tail -40

el "2. routing: plain vs fused, per tile configuration"
timeout ${T_TILES:-100} python3 tests/benchmarks/routing_tiles.py --batch-sizes 128,512 \
  ${CONFIGS:+--configs $CONFIGS} --profile --out $OUT/routing_tiles.csv 2>&1 \
  | tee /tmp/tiles.log | grep -v "^capsbench: warning"
BEST=$(grep '^BEST ' /tmp/tiles.log | awk '{print $2}')
if [ -n "$BEST" ]; then export CAPSBENCH_ROUTING_TILES=$BEST; el "tiles $BEST"
else export CAPSBENCH_ROUTING=torch; el "no fused configuration ran: the rest uses the plain routing"; fi

el "3. capsbench speed"
timeout ${T_SPEED1:-140} python3 -m capsbench speed --device cuda --routing triton --variants bf16_cl,bf16_cl_graph \
  --batch-sizes 128,512,1024 --budget 1 --infer-batch 4096 --epoch --deadline 110 --out /tmp/sp1 2>&1 | grep -v "^capsbench: warning"
timeout ${T_SPEED2:-50} python3 -m capsbench speed --device cuda --routing torch --variants bf16_cl \
  --batch-sizes 128,512 --budget 1 --infer-batch 4096 --out /tmp/sp2 2>&1 | grep -v "^capsbench: warning"
cp /tmp/sp1/speed-cuda/results.csv $OUT/speed_fused.csv 2>/dev/null
cp /tmp/sp2/speed-cuda/results.csv $OUT/speed_plain.csv 2>/dev/null

TP=$(( $(left) - ${T_OOM_RESERVE:-0} ))
EP=$(python3 - "$TP" <<'PY'
import sys, pandas as pd
avail = int(sys.argv[1]) - 25  # start-up, data, the final evaluation
try:
    r = pd.read_csv("/tmp/sp1/speed-cuda/results.csv")
    e = float(r[(r.variant == "bf16_cl_graph") & (r.batch_size == 128)].epoch_s.iloc[0])
except Exception:
    e = 1.4
print(max(1, min(150, int(avail / (1.1 * e + 0.15)))))
PY
)
el "4. paper protocol: capsnet --profile paper --epochs $EP (bf16, channels_last, CUDA graph, curve), ${TP}s"
timeout $TP python3 -m capsbench train --model capsnet --profile paper --epochs $EP --device cuda --amp bf16 \
  --out /tmp/paper --no-progress --curve --channels-last --cuda-graph 2>&1 | grep -v "^capsbench: warning"
J=$(ls -d /tmp/paper/jobs/capsnet-* 2>/dev/null | head -1)
[ -n "$J" ] && cp "$J/job.json" $OUT/paper_job.json 2>/dev/null
[ -n "$J" ] && cp "$J/run.json" $OUT/paper_run.json 2>/dev/null
[ -n "$J" ] && python3 - "$J" <<'PY' > $OUT/paper_curve.txt
import sys, torch
st = torch.load(sys.argv[1] + "/checkpoint.pt", map_location="cpu", weights_only=False)
print("checkpoint step", st["step"], "elapsed", round(st["elapsed"], 1), "s, finished", st.get("finished"))
for h in st["history"]:
    if "val_acc" in h:
        print(f"epoch {h['epoch']:g} step {h['step']} val_acc {h['val_acc']:.4f}")
PY
tail -12 $OUT/paper_curve.txt 2>/dev/null

if [ "$(left)" -gt 40 ]; then
  el "5. real CUDA out-of-memory retry test"
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_resilience.py 2>&1 | tail -3
fi
el done
