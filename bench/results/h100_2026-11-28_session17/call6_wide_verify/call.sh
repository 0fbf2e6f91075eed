#!/bin/bash
set -u
OUT=${OUT:-/tmp/out}; K=/root/kern; mkdir -p $K
export PYTHONUNBUFFERED=1
pip install -q --no-deps --upgrade --target /tmp/gp .gpu-wheel/*.whl > $K/pip.log 2>&1
pip install -q --no-deps --upgrade --target /tmp/gpb .gpu-wheel-base/*.whl >> $K/pip.log 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $K/card.txt; cat COMMIT | tee $K/commit.txt
PYTHONPATH=/tmp/gp timeout 150 python3 -m pytest -q tests/gpu/test_nf4_gpu.py -k "wide" 2>&1 | tail -4 | tee $K/test_wide.log
for r in base head base2 head2; do
  gp=/tmp/gp; case $r in base*) gp=/tmp/gpb;; esac
  echo "== $r"
  PYTHONPATH=$gp timeout 80 python3 bench/sweep_nf4_mma.py --ms 33,48,64 --paths auto 2>&1 | grep -v "^#" | tee -a $K/auto_$r.log
done
PYTHONPATH=/tmp/gp timeout 80 python3 bench/sweep_nf4_mma.py --ms 33,48,64 --paths dequant_matmul,mma_s 2>&1 | grep -v "^#" | tee -a $K/other_paths.log
tar czf $OUT/kernels.tgz -C $K .
