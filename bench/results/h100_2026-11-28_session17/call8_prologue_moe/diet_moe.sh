#!/bin/bash
set -u
OUT=${OUT:-/tmp/out}; K=/root/kern; mkdir -p $K
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/gp
pip install -q --no-deps --upgrade --target /tmp/gp .gpu-wheel/*.whl > $K/pip.log 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $K/card.txt; cat COMMIT >> $K/card.txt
mkdir -p /tmp/kb && cp kernels/*.cu kernels/common.cuh /tmp/kb/
for r in base diet base2 diet2; do
  d=/tmp/kb; case $r in diet*) d=$PWD/.gpu-variants/b_diet;; esac
  GPTOSS_3090_KERNEL_DIR=$d timeout 100 python3 .scratch/diet_moe.py $r 2>&1 | tail -5 | tee -a $K/diet_moe.log
done
python3 -c "
import torch
a=torch.load('/root/kern/moe_base.pt'); b=torch.load('/root/kern/moe_diet.pt')
print('bit-identical:', all(torch.equal(a[k], b[k]) for k in a), sorted(a))
" 2>&1 | tee -a $K/diet_moe.log
tar czf $OUT/kernels.tgz -C $K .
