#!/bin/bash
set -u
OUT=${OUT:-/tmp/out}; K=/root/kern; mkdir -p $K
export PYTHONPATH=/tmp/gp PYTHONUNBUFFERED=1
pip install -q --no-deps --upgrade --target /tmp/gp .gpu-wheel/*.whl > $K/pip.log 2>&1
for v in a_base b_xvol c_nox d_nocomp e_empty; do
  for s in 6 1; do
    echo "== $v splits $s"
    GPTOSS_3090_KERNEL_DIR=$PWD/.gpu-variants/$v GPTOSS_3090_NF4_SPLITS=$s timeout 60 python3 bench/sweep_nf4_mma.py --shapes 5120x2880 --ms 64 --paths wide 2>&1 | grep -v "^#" | tee -a $K/diag.log
  done
done
tar czf $OUT/kernels.tgz -C $K .
