#!/bin/bash
# One GPU-host sitting, in three calls (the vLLM bundle travels in three parts; the machine keeps
# files only while warm). Run from the repository root on the GPU host:
#   bash bench/gpu_session.sh 1   # carry .gpu-wheel + .gpu-bundle/part-1: kernel GPU tests
#   bash bench/gpu_session.sh 2   # carry .gpu-bundle/part-2
#   bash bench/gpu_session.sh 3   # carry .gpu-bundle/part-3: install vLLM, tests + benchmarks vs vLLM
# Logs and JSON go to $OUT.
set -u
phase=${1:?phase 1|2|3}
export PYTHONUNBUFFERED=1
mkdir -p /root/stage
cp ".gpu-bundle/part-$phase"/* /root/stage/ 2>/dev/null && ls /root/stage
commit=$(cat COMMIT 2>/dev/null || echo unknown)
echo "commit $commit  $(date -u +%FT%TZ)  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
if [ "$phase" = 1 ]; then
  python3 -m pip install -q --upgrade --no-deps --target /tmp/gp .gpu-wheel/*.whl 2>&1 | tail -1
fi
export PYTHONPATH=/tmp/gp
run() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"; tail -n "${TAIL:-8}" "$OUT/$name.log"; }
case $phase in
1)
  for t in nf4 moe attention; do
    run "test_${t}_gpu" 200 python3 -m pytest -q -rfEs -p no:cacheprovider "tests/gpu/test_${t}_gpu.py"
  done ;;
3)
  bash /root/stage/install-bundle.sh /root/stage /tmp/site 2>&1 | tail -2
  export PYTHONPATH=/tmp/gp:/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
  run test_attention_gpu_vs_vllm 150 python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_attention_gpu.py
  TAIL=30 run bench_attention 200 python3 bench/bench_attention.py --baseline triton --out "$OUT/bench_attention.json"
  TAIL=20 run bench_moe 200 python3 bench/bench_moe.py --tokens 1,4,16,64,512,2048 --tunings auto --out "$OUT/bench_moe.json" --commit "$commit"
  python3 -m gptoss_3090.cli synth /tmp/tiny --preset tiny --quiet > "$OUT/synth.log" 2>&1 || python3 -c "from gptoss_3090.synth import write_synthetic_checkpoint as w; w('/tmp/tiny','tiny',progress=False)"
  TAIL=20 run vllm_smoke 240 python3 bench/vllm_smoke.py --ckpt /tmp/tiny --out "$OUT/vllm_smoke.json"
  ;;
esac
