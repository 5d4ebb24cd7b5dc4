#!/bin/bash
# One leased-GPU session for issue #6 (speed), run from the repository root on the device
# machine: correctness on CUDA, `capsbench speed` per variant and batch size, then the paper
# protocol (capsnet, --profile paper) for as long as the lease allows, with its learning curve.
# Usage: OUT=<folder for results> DATA=<data root> bash tests/benchmarks/gpu_session.sh
# Every stage has its own timeout so one slow stage cannot eat the next one's time.
set -u
export PYTHONUNBUFFERED=1 CAPSBENCH_DATA=${DATA:-$PWD/.devdata} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'timm', timm.__version__)"

el "1. CUDA correctness tests"
timeout ${T_TESTS:-110} python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
  tests/test_speed.py tests/test_transforms.py 2>&1 | tail -8

el "2. capsbench speed"
timeout ${T_SPEED1:-60} python3 -m capsbench speed --device cuda --variants fp32,bf16 --batch-sizes 128,512 \
  --budget 1 --infer-batch 4096 --out /tmp/sp1 2>&1 | grep -v "^capsbench: warning"
timeout ${T_SPEED2:-130} python3 -m capsbench speed --device cuda --variants bf16_cl,bf16_cl_graph --batch-sizes 128,512,1024 \
  --budget 1 --infer-batch 4096 --epoch --deadline 100 --out /tmp/sp2 2>&1 | grep -v "^capsbench: warning"
cp /tmp/sp1/speed-cuda/results.csv $OUT/speed_fp32_bf16.csv 2>/dev/null
cp /tmp/sp2/speed-cuda/results.csv $OUT/speed_cl_graph.csv 2>/dev/null

el "3. paper protocol: capsnet --profile paper (bf16, channels_last, CUDA graph, learning curve)"
P="python3 -m capsbench train --model capsnet --profile paper --device cuda --amp bf16 --out /tmp/paper --no-progress --curve --channels-last"
timeout ${T_PAPER:-230} $P --cuda-graph 2>&1 | grep -v "^capsbench: warning" || {
  el "graph run stopped (status $?); resuming the same job eagerly if time is left"; }
J=$(ls -d /tmp/paper/jobs/capsnet-* 2>/dev/null | head -1)
[ -n "$J" ] && cp "$J/job.json" $OUT/paper_job.json 2>/dev/null
[ -n "$J" ] && cp "$J/run.json" $OUT/paper_run.json 2>/dev/null
[ -n "$J" ] && python3 - "$J" <<'PY' > $OUT/paper_curve.txt
import sys, torch
st = torch.load(sys.argv[1] + "/checkpoint.pt", map_location="cpu", weights_only=False)
print("checkpoint step", st["step"], "elapsed", round(st["elapsed"], 1), "s, finished", st.get("finished"))
for h in st["history"]:
    if "test_acc" in h:
        print(f"epoch {h['epoch']:g} step {h['step']} test_acc {h['test_acc']:.4f}")
PY
cat $OUT/paper_curve.txt 2>/dev/null | tail -60

el "4. real CUDA out-of-memory retry test"
timeout ${T_OOM:-120} python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_resilience.py 2>&1 | tail -3
el done
