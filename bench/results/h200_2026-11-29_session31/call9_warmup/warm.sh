#!/bin/bash
set -u
export PYTHONUNBUFFERED=1
pip install -q --no-deps --target /tmp/gpn .gpu-wheel/*.whl >/dev/null 2>&1
pip install -q --no-deps --target /tmp/gpb .gpu-wheel-base/*.whl >/dev/null 2>&1
echo "cores $(nproc); new $(cat COMMIT), base 7da8132"
PYTHONPATH=/tmp/gpn GPTOSS_3090_CACHE=/tmp/cache_new timeout 100 python3 -c "
import time, torch, gptoss_3090 as g
t=time.time(); g.runtime.warmup(); print('new wheel: cold runtime.warmup() (families side by side, then load):', round(time.time()-t,1), 's')
t=time.time(); g.runtime.warmup(); print('new wheel: second warmup():', round(time.time()-t,2), 's')"
PYTHONPATH=/tmp/gpb GPTOSS_3090_CACHE=/tmp/cache_base timeout 115 python3 -c "
import time, gptoss_3090._native as n
t=time.time(); n.compile_kernels('sm_90'); print('base wheel: cold compile_kernels(sm_90), one family after another:', round(time.time()-t,1), 's')"
for f in nf4 moe moe_chunks attention; do a=$(ls /tmp/cache_new/$f-sm90-*.cubin); b=$(ls /tmp/cache_base/$f-sm90-*.cubin 2>/dev/null); [ -n "$b" ] && cmp -s "$a" "$b" && echo "$f: same cache key and bytes" || echo "$f: differs or missing"; done
PYTHONPATH=/tmp/gpn GPTOSS_3090_CACHE=/tmp/cache_new timeout 35 python3 -m pytest -q -x tests/gpu/test_nf4_gpu.py -k "linear_cuda_graph_replay or fused_qkv" 2>&1 | tail -3
