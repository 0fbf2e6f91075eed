#!/bin/bash
set -u
mkdir -p /root/c2 "$OUT"
pip install -q --no-deps --upgrade --target /tmp/gp .gpu-wheel/*.whl > /root/c2/pip.log 2>&1
export PYTHONPATH=/tmp/gp PYTHONUNBUFFERED=1
echo "commit $(cat COMMIT)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 - <<'PY' 2>&1 | tee /root/c2/clusters.txt
from gptoss_3090 import _native, runtime
runtime.warmup()
for e in ("nf4_linear_wide_bf16", "nf4_linear_wide_plain_bf16"):
    print(e, {s: _native.max_active_clusters(0, "nf4", e, s, 256, 65536 + 2 * 64 * 256) for s in range(1, 9)})
for m, n, k in [(64, 5120, 2880), (64, 2880, 4096), (64, 5760, 2880)]:
    print((m, n, k), _native.cuda_nf4_linear_plan(0, m, n, k, "wide"))
PY
python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_nf4_gpu.py -k cluster -s > /root/c2/test_cluster.log 2>&1
grep -E "wide cluster|passed|failed" /root/c2/test_cluster.log | sort | uniq | tail -12
GPTOSS_3090_NF4_SPLITS=6 python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_nf4_gpu.py -k cluster -s > /root/c2/test_cluster_forced6.log 2>&1
grep -E "wide cluster|passed|failed" /root/c2/test_cluster_forced6.log | sort | uniq | tail -12
for mode in launch cluster; do
  echo "-- forced 6 splits, $mode"
  GPTOSS_3090_NF4_SPLITS=6 GPTOSS_3090_WIDE_REDUCE=$mode python3 bench/linear_kernel_times.py --shapes 4096+512+512x2880 --ms 64 2>&1 | grep -v Warn | grep -v warn_once | tee -a /root/c2/forced6.log
done
timeout 300 bash bench/gpu_kernels.sh widereduce > /root/c2/widereduce.txt 2>&1
grep -E "^--|M=64|   64 \|" /root/c2/widereduce.txt
cp -r /root/c2 "$OUT/"
