#!/bin/bash
# wide kernel: tests, then sweep against dequant+cuBLAS / mma / cuBLAS on the q/k/v and o shapes
set -u
OUT=${OUT:-/tmp/out}; K=/root/kern; mkdir -p $K
export PYTHONPATH=/tmp/gp PYTHONUNBUFFERED=1
pip install -q --no-deps --upgrade --target /tmp/gp .gpu-wheel/*.whl > $K/pip.log 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $K/card.txt
cat COMMIT
timeout 200 python3 -m pytest -q -x tests/gpu/test_nf4_gpu.py -k "wide or stream_path or fused_qkv or graph_replay" 2>&1 | tail -15 | tee $K/test_wide.log
for s in "" 1 2 3 4 6 8; do
  GPTOSS_3090_NF4_SPLITS=$s timeout 100 python3 bench/sweep_nf4_mma.py --ms 33,48,64 --paths wide 2>&1 | grep -v "^#" | tee -a $K/sweep_wide.log
done
timeout 120 python3 bench/sweep_nf4_mma.py --ms 33,48,64 --paths auto,dequant_matmul 2>&1 | tee -a $K/sweep_wide.log
GPTOSS_3090_FORCE_TUNING=sm86 timeout 100 python3 bench/sweep_nf4_mma.py --ms 48,64 --paths wide,auto 2>&1 | tee -a $K/sweep_wide.log
tar czf $OUT/kernels.tgz -C $K .
