#!/bin/bash
# A GPU-host sitting for the end-to-end items (issue 6) and the kernel benchmarks, built for the
# device tool's limits: 600 s per call, the machine stays warm only 30 s between calls, and the
# vLLM bundle travels in parts (scripts/gpu-bundle.sh). Long jobs therefore run in a background
# queue (setsid) that outlives each call; every call ends by packing the results so far into
# $OUT/e2e.tgz. Issue the stage calls and the start call as one batch of device calls.
#
#   bash bench/gpu_e2e.sh stage 1            # carry .gpu-wheel, .gpu-bundle/part-1, COMMIT:
#                                            #   install our wheel, start the 20b synth (CPU)
#   bash bench/gpu_e2e.sh stage N            # carry .gpu-bundle/part-N, COMMIT (every part but
#                                            #   the last), back to back: the machine forgets
#                                            #   /root/stage 30 s after a call
#   bash bench/gpu_e2e.sh start JOB... [-- WAIT_S]   # carry the last part, .gpu-wheel, COMMIT:
#                                            #   install vLLM, queue the jobs, wait until WAIT_S
#                                            #   (default 540) after the call began, then pack;
#                                            #   keep WAIT_S 20 s under the call's limit (which
#                                            #   is the device budget left, when that is less)
#   bash bench/gpu_e2e.sh wait [WAIT_S]      # later calls: wait for the queue, pack results
#
# Carry limit: the repository, the wheel and a part must stay under 64 MiB together.
# `bash scripts/gpu-bundle.sh` makes .gpu-bundle and cuts it into parts that fit (it prints how
# many); install-bundle.sh concatenates bundle.tgz.part* in name order.
#
# Jobs (run in the order given, one GPU job at a time): moetest, nf4test, kernels, kernels_skew,
# nf4bench, profile, correctness, correctness1, correctness_knobs, correctness32, server, chat,
# budget24, qal, e2e, e2e_decode, e2e_dummy, e2e_env, e2e_coldstart, e2e_routing, e2e_profile,
# e2e_pdl, router, attntest, attnkeys, readfloor, smoke.
# Results land in /root/e2e/{status,logs,res}.
set -u
# The folders are fixed on the GPU host; tests point them elsewhere (tests/test_gpu_e2e_script.py).
W=${GPU_E2E_DIR:-/root/e2e}
CK=${GPU_E2E_CK:-/root/ck}
STAGE=${GPU_E2E_STAGE:-/root/stage}
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
export PYTHONPATH=/tmp/gp:/tmp/site PATH=/tmp/site/bin:/tmp/gp/bin:$PATH
mkdir -p "$W/logs" "$W/res" "$CK" "$STAGE"
commit=$(cat COMMIT 2>/dev/null || echo unknown)
# The device copy's git metadata can be stale: benchmarks record the wheel's commit instead.
export GPTOSS_3090_GIT_COMMIT=$commit

pack() {
  # The Triton source of the per-layer Inductor kernels the traces name only generically
  # (INDUCTOR_KERNELS), once an engine has compiled them on this machine.
  # shellcheck disable=SC2086  # a list of names
  python3 bench/inductor_kernels.py ${INDUCTOR_KERNELS:-triton_poi_fused_2 triton_poi_fused_3} \
    --out "$W/inductor_kernels.txt" > /dev/null 2>&1 || true
  df -h / | tail -1 > "$W/disk.txt"
  nvidia-smi --query-gpu=name,memory.used --format=csv,noheader >> "$W/disk.txt" 2>&1
  tar czf "$OUT/e2e.tgz" -C "$W" --exclude='*.safetensors' --exclude='*.ncu-rep' . 2>/dev/null
  ls -la "$OUT"
}

status() { echo "$(date -u +%T) $*" | tee -a "$W/status"; }

job_moetest() {
  # GPU tests of the MoE kernels (MOETEST_K: a pytest -k expression, e.g. router). If the whole
  # file fails, every later job of this sitting falls back to the first decode variant on
  # row-order experts.
  if [ -n "${MOETEST_K:-}" ]; then
    python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_moe_gpu.py -k "$MOETEST_K"
    return
  fi
  # Only failed tests (pytest exit 1) switch the fallback on: a file that could not even be
  # collected (exit 2, e.g. the wheel missing) says nothing about the kernels, and session 33's
  # sitting ran every later job on the fallback that way.
  python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_moe_gpu.py
  local rc=$?
  if [ "$rc" = 1 ]; then
    echo "export GPTOSS_3090_MOE_DECODE=1 GPTOSS_3090_MOE_WEIGHTS_ORDER=rows" >> "$W/env"
  fi
  return "$rc"
}

job_nf4bench() {
  python3 bench/bench_nf4_linear.py --shapes 5760x2880,2880x2880,4096x2880,2880x4096,512x2880 \
    --tunings auto,sm86 --no-bnb --out "$W/res/nf4_linear.json"
}

job_kernels() {
  # The full table on chunk-major experts (as served) with the Marlin MXFP4 and bf16 baselines
  # (both sides given the same top-k, as vLLM serves), then the row-order experts as stored.
  python3 bench/bench_moe.py --tokens 1,2,4,8,16,32,64,128,512,2048,8192 --tunings auto,sm86 \
    --layers 24 --out "$W/res/moe.json" --commit "$commit"
  python3 bench/bench_moe.py --tokens 1,2,4,8,16,32,64,128,512,2048,8192 --tunings auto \
    --layers 24 --no-baselines --weights-order rows --out "$W/res/moe_rows.json" \
    --commit "$commit"
}

job_kernels_skew() {
  # Ours against Marlin with skewed routing (bench_moe.py --routing-skew: some experts get many
  # of a batch's pairs, as a real model's routing does; 0.35 matches what our 20b synthetic
  # checkpoint touched in vLLM at 64 tokens), at SKEW_TOKENS for each of MOE_SKEWS.
  local sk
  for sk in ${MOE_SKEWS:-0 0.35 0.7}; do
    python3 bench/bench_moe.py --tokens "${SKEW_TOKENS:-16,32,64,128}" --tunings auto \
      --layers 24 --routing-skew "$sk" --out "$W/res/moe_skew_$sk.json" --commit "$commit"
  done
}

job_profile() {
  local ncu=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
  local sec="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section LaunchStats --section Occupancy --section InstructionStats"
  # shellcheck disable=SC2086
  $ncu --graph-profiling node -k regex:'moe_dec|moe_route' -c 6 $sec \
    python3 bench/bench_moe.py --tokens 1 --tunings auto --layers 2 --no-baselines --iters 2 \
    > "$W/res/ncu_moe.txt" 2>&1
  # shellcheck disable=SC2086
  $ncu --graph-profiling node -k regex:'nf4_linear_decode' -c 2 $sec \
    python3 bench/bench_nf4_linear.py --shapes 5760x2880 --ms 1 --tunings auto --no-bnb --quick \
    > "$W/res/ncu_nf4.txt" 2>&1
}

job_correctness() {
  python3 tests/gpu/test_vllm_e2e.py correctness --out "$W/res/correctness" --workdir "$CK/tiny"
}

job_correctness1() {
  # Item 1 on the nested checkpoint only (ours and the sinks=-30 control vs stock TRITON_ATTN,
  # same sitting): a quick
  # re-check after kernel changes.
  python3 tests/gpu/test_vllm_e2e.py correctness --out "$W/res/correctness1" --workdir "$CK/tiny" \
    --variants nested --engines ours negative_sinks_minus30
}
job_correctness_knobs() {
  # Item 1's measures (teacher-forced |logprob diff| and regret against transformers, nested
  # checkpoint) for ours under the non-default settings of KNOB_ENGINES (tests/gpu/
  # test_vllm_e2e.py): MoE routing in our router layer or in our MoE op, a 512-key decode split.
  # Diagnostic: the verdict stays with the default engine.
  python3 tests/gpu/test_vllm_e2e.py correctness --out "$W/res/correctness_knobs" \
    --workdir "$CK/tiny" --variants nested --engines ours knob_moe_routing_router \
    knob_moe_routing_internal knob_attn_min_keys_512 negative_sinks_minus30
}

job_correctness32() {
  # Item 1's nested checkpoint again with 4 sets of 8 prompts (the first set is the standard
  # one): the regret measure over 256 tokens is noisy; this shows how much.
  python3 tests/gpu/test_vllm_e2e.py correctness --out "$W/res/correctness32" --workdir "$CK/tiny" \
    --variants nested --repeats 4 \
    --engines ours ours_quantize_at_load glue_torch_reference negative_sinks_minus30
}

job_chat() {
  # Harmony needs o200k token ids, so the chat model has the 20b vocabulary; the tiny shapes
  # keep the server start short.
  python3 -c "
from gptoss_3090.presets import get_preset
from gptoss_3090.synth import write_synthetic_checkpoint as w
c, b = get_preset('tiny'), get_preset('20b')
for k in ('vocab_size', 'eos_token_id', 'pad_token_id'):
    c[k] = b[k]
w('$CK/tiny_fullvocab', c, progress=False, reference=False, overwrite=True)
"
  python3 tests/gpu/test_vllm_e2e.py chat --out "$W/res/chat" --chat-model "$CK/tiny_fullvocab"
}

job_server() {
  python3 tests/gpu/test_vllm_e2e.py server --out "$W/res/server" --workdir "$CK/tiny_server"
}

wait_synth() {
  while [ ! -e "$CK/synth20b.done" ]; do sleep 5; done
}

job_budget24() {
  wait_synth
  python3 tests/gpu/test_vllm_e2e.py budget24 --out "$W/res/budget24" --model "$CK/g20b"
}

job_qal() {
  wait_synth
  python3 tests/gpu/test_vllm_e2e.py quantize-at-load --out "$W/res/qal" --model "$CK/g20b/reference"
}

job_e2e() {
  wait_synth
  python3 bench/bench_vllm_e2e.py --ours "$CK/g20b" --out "$W/res/e2e"
}

job_e2e_decode() {
  # Decode at batch 16 and 64 only (0.85 of the card), both sides: the e2e job's decode rows
  # without its prefill and 24 GiB runs. E2E_WORKLOADS picks the workloads (e.g. decode_b1
  # prefill_16x2048), E2E_BUDGETS the budgets (full, 24gib: 23.0 GiB, an RTX 3090's).
  wait_synth
  # shellcheck disable=SC2086  # lists of budgets and workloads
  python3 bench/bench_vllm_e2e.py --ours "$CK/g20b" --out "$W/res/e2e_decode" \
    --budgets ${E2E_BUDGETS:-full} --workloads ${E2E_WORKLOADS:-decode_b16 decode_b64}
  # Each side's decode rows against the bandwidth floor, where job readfloor ran first.
  if [ -f "$W/res/read_floor.json" ]; then
    python3 bench/decode_floor.py --result "$W/res/e2e_decode/result.json" \
      --read-floor "$W/res/read_floor.json" --out "$W/res/e2e_decode/floor.md" || true
  fi
}

job_e2e_coldstart() {
  # Engine start with cold kernel caches, the background compile on and off alternated
  # (COLD_RUNS, default "on off on off"), ours only, decode_b1 (COLD_WORKLOADS). Each engine
  # compiles kernel sources nothing on this machine has compiled before: this checkout's kernels
  # with a unique comment appended to common.cuh (GPTOSS_3090_KERNEL_DIR) and a fresh
  # GPTOSS_3090_CACHE, so neither our cache nor any NVRTC-level cache can serve them (session
  # 33's fresh-folder A/B found its families compiled in 1.2 s). Neither setting is part of
  # vLLM's compile-cache key, so every engine loads the same torch.compile graph: queue it after
  # e2e_decode or another ours engine of the default settings. Table: res/coldstart.md.
  wait_synth
  python3 -c "from gptoss_3090 import _native, runtime; runtime.ensure_cuda_libs(); \
print('NVRTC', _native.nvrtc_version(), runtime.doctor().get('nvrtc'))" 2>&1 | tail -1
  local i=0 mode kd folders=()
  for mode in ${COLD_RUNS:-on off on off}; do
    i=$((i + 1))
    kd=$W/coldstart_kernels_$i
    rm -rf "$kd" && mkdir -p "$kd" && cp kernels/*.cu kernels/common.cuh "$kd"/
    echo "// e2e_coldstart $i $(date +%s%N)" >> "$kd/common.cuh"
    # shellcheck disable=SC2086  # a list of workloads
    GPTOSS_3090_KERNEL_DIR=$kd GPTOSS_3090_CACHE=$W/coldstart_cache_$i GPTOSS_3090_PRECOMPILE=$mode \
      python3 bench/bench_vllm_e2e.py --ours "$CK/g20b" --sides ours \
      --out "$W/res/coldstart_${i}_$mode" --budgets full --workloads ${COLD_WORKLOADS:-decode_b1}
    folders+=("$W/res/coldstart_${i}_$mode")
    rm -rf "$W/coldstart_cache_$i" "$kd"
  done
  python3 bench/coldstart_summary.py "${folders[@]}" --out "$W/res/coldstart.md"
}

job_e2e_env() {
  # Ours only, one engine per entry of E2E_ENV_RUNS (space-separated; each entry is one or more
  # VAR=value settings joined by commas, e.g. GPTOSS_3090_ATTN_ROPE=vllm), at E2E_ENV_WORKLOADS
  # (default decode_b1 decode_b16 decode_b64), 0.85 of the card: a same-sitting A/B of a
  # setting against e2e_decode's ours side. A setting may repeat (entries run in the given order,
  # so A B A B interleaves them); the Nth run of a setting lands in e2e_env_<name>_runN.
  # PROFILE_WORKLOAD (one of the workloads, e.g. decode_b16) also traces 32 decode steps of each
  # engine there and writes one kernel table for all runs (res/e2e_env_kernels.md).
  # res/e2e_env_agree.md: each engine's first-request greedy tokens against the first engine's.
  # E2E_DETERMINISM=N: each engine also repeats each workload's same prompts N times and
  # compares all requests' tokens (summary rows "runs repeating the first exactly").
  wait_synth
  local run name out prof=() folders=() results=()
  [ -n "${PROFILE_WORKLOAD:-}" ] && prof=(--profile-workload "$PROFILE_WORKLOAD")
  for run in ${E2E_ENV_RUNS:?E2E_ENV_RUNS}; do
    name=$(echo "$run" | tr ',=' '__' | tr -cd 'A-Za-z0-9_.-')
    out="$W/res/e2e_env_$name"
    if [ -e "$out" ]; then
      local n=2
      while [ -e "${out}_run$n" ]; do n=$((n + 1)); done
      out="${out}_run$n"
    fi
    # shellcheck disable=SC2086  # a list of workloads; the settings split on commas
    env ${run//,/ } python3 bench/bench_vllm_e2e.py --ours "$CK/g20b" --sides ours \
      --out "$out" --budgets full \
      --workloads ${E2E_ENV_WORKLOADS:-decode_b1 decode_b16 decode_b64} "${prof[@]}" \
      --determinism "${E2E_DETERMINISM:-0}"
    [ -f "$out/ours_full.json" ] && results+=("$out/ours_full.json")
    if [ -n "${PROFILE_WORKLOAD:-}" ] && [ -d "$out/traces/ours_full" ]; then
      mv "$out/traces/ours_full" "$out/traces/$(basename "$out")"
      folders+=("$out/traces/$(basename "$out")")
    fi
  done
  # Each engine's greedy tokens against the first's (the same prompts in every engine).
  python3 bench/bench_vllm_e2e.py agree "${results[@]}" --out "$W/res/e2e_env_agree.md" || true
  if [ ${#folders[@]} -gt 0 ]; then
    python3 bench/trace_kernels.py "${folders[@]}" --steps 32 --out "$W/res/e2e_env_kernels.md"
    rm -rf "$W"/res/e2e_env_*/traces
  fi
}

job_attntest() {
  python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_attention_gpu.py
}

job_attnkeys() {
  # bench_attention.py decode at ATTN_CASES planned for a 131072-token bound (as vLLM's graphs)
  # at the default run-time split length, then each of ATTN_MIN_KEYS (default "512 1024": the
  # fewest keys a split takes, GPTOSS_3090_ATTN_MIN_KEYS in vLLM), then the default again.
  local w opts
  for w in default ${ATTN_MIN_KEYS:-512 1024} default2; do
    opts=()
    case $w in default*) ;; *) opts=(--min-keys "$w") ;; esac
    echo "-- min keys per split: $w"
    python3 bench/bench_attention.py --only decode --seq-bound 131072 \
      --decode-cases "${ATTN_CASES:-1x256,1x384,1x512,1x1024,16x384,16x1024}" "${opts[@]}" \
      --out "$W/res/attn_keys_$w.json" 2>&1 | grep -v "^wrote"
  done
}

job_readfloor() {
  # The card's copy bandwidth and the read floor at decode sizes (bench/read_floor.py), for
  # bench/decode_floor.py's bandwidth floor of a decode step in the same sitting.
  python3 bench/read_floor.py --sizes-mb 0.75,8.4,33.6,268 --out "$W/res/read_floor.json"
}

job_e2e_dummy() {
  # Stock with vLLM's dummy router weights (every token routed to the same 4 experts), to show
  # in the same sitting what redrawing the routers changes.
  python3 bench/bench_vllm_e2e.py --ours "$CK/g20b" --out "$W/res/e2e_dummy" --sides stock \
    --budgets full --stock-weights dummy
}

job_e2e_routing() {
  # Ours with each routing mode of E2E_ROUTING_RUNS in turn (GPTOSS_3090_MOE_ROUTING; default
  # "vllm router": vLLM's top-k launch then our MoE op, against our router routing in its own
  # launch), one engine each, at E2E_WORKLOADS (default decode_b1 decode_b64), ours only.
  # PROFILE_WORKLOAD (one of them, e.g. decode_b64) also traces 32 decode steps of each engine
  # there and writes one kernel table for all modes (res/e2e_routing_kernels.md).
  wait_synth
  local mode prof=() folders=()
  [ -n "${PROFILE_WORKLOAD:-}" ] && prof=(--profile-workload "$PROFILE_WORKLOAD")
  for mode in ${E2E_ROUTING_RUNS:-vllm router}; do
    # shellcheck disable=SC2086  # a list of workloads
    GPTOSS_3090_MOE_ROUTING=$mode python3 bench/bench_vllm_e2e.py --ours "$CK/g20b" \
      --out "$W/res/e2e_routing_$mode" --sides ours --budgets full \
      --workloads ${E2E_WORKLOADS:-decode_b1 decode_b64} "${prof[@]}"
    if [ -n "${PROFILE_WORKLOAD:-}" ]; then
      mv "$W/res/e2e_routing_$mode/traces/ours_full" "$W/res/e2e_routing_$mode/traces/$mode"
      folders+=("$W/res/e2e_routing_$mode/traces/$mode")
    fi
  done
  if [ ${#folders[@]} -gt 0 ]; then
    python3 bench/trace_kernels.py "${folders[@]}" --steps 32 --out "$W/res/e2e_routing_kernels.md"
    rm -rf "$W"/res/e2e_routing_*/traces
  fi
}

job_router() {
  # The router with its top-k (one launch of clusters on sm_90, and two launches) against
  # vLLM's top-k launch after F.linear (stock) and after our logits kernel (the plugin's
  # default): needs vLLM, so it runs in a sitting.
  python3 bench/bench_router.py --tokens 1,2,4,8,16,32,64 --out "$W/res/router.json"
}

job_e2e_profile() {
  # Where a decode step's time goes, kernel by kernel, ours vs stock at batch 64 (0.85 of the
  # card; PROFILE_WORKLOAD=decode_b1 or decode_b16 for another batch, or a comma list such as
  # decode_b1,decode_b64): 32 traced decode steps per side, then bench/trace_kernels.py.
  wait_synth
  local wls=${PROFILE_WORKLOAD:-decode_b64} wl res
  for wl in ${wls//,/ }; do
    res="$W/res/e2e_profile_$wl"
    python3 bench/bench_vllm_e2e.py --ours "$CK/g20b" --out "$res" --budgets full \
      --workloads "$wl" --profile-workload "$wl"
    python3 bench/trace_kernels.py "$res/traces/stock_full" "$res/traces/ours_full" --steps 32 \
      --out "$res/kernels.md"
    # The traces themselves are large; keep the summary only.
    rm -rf "$res/traces"
  done
}

job_e2e_pdl() {
  # Does programmatic dependent launch survive vLLM's captured graphs, and what does it buy end
  # to end? Ours only, at PROFILE_WORKLOAD (default decode_b1), one engine per entry of
  # E2E_PDL_RUNS (default "on off"), each timed and then traced; one kernel table for all (its
  # "Early starts" section lists the kernels that ran alongside the one before them). An entry
  # is GPTOSS_3090_PDL's value (on, off, linear, moe), optionally :FOLD for
  # GPTOSS_3090_MOE_FOLD_COMBINE (e.g. on:off).
  wait_synth
  local wl=${PROFILE_WORKLOAD:-decode_b1} run name fold res=$W/res/e2e_pdl folders=()
  for run in ${E2E_PDL_RUNS:-on off}; do
    name=pdl_${run/:/_fold_} fold=auto
    [[ $run == *:* ]] && fold=${run#*:}
    GPTOSS_3090_PDL=${run%%:*} GPTOSS_3090_MOE_FOLD_COMBINE=$fold \
      python3 bench/bench_vllm_e2e.py --ours "$CK/g20b" --sides ours \
      --out "$res/$name" --budgets full --workloads "$wl" --profile-workload "$wl"
    mv "$res/$name/traces/ours_full" "$res/$name/traces/$name"
    folders+=("$res/$name/traces/$name")
  done
  python3 bench/trace_kernels.py "${folders[@]}" --steps 32 --out "$res/kernels.md"
  rm -rf "$res"/pdl_*/traces
}

job_nf4test() {
  python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_nf4_gpu.py
}

job_smoke() {
  python3 -m gptoss_3090.cli demo
  wait_synth
  python3 -m gptoss_3090.cli doctor --checkpoint "$CK/g20b"
}

case ${1:?stage|start|wait} in
stage)
  n=${2:?part}
  # A warm machine keeps the parts of an earlier cut (other names and sizes), which
  # install-bundle.sh would concatenate with these ones.
  [ "$n" = 1 ] && rm -f "$STAGE"/bundle.tgz.part*
  cp ".gpu-bundle/part-$n"/* "$STAGE"/ && ls "$STAGE"
  if [ "$n" = 1 ]; then
    echo "commit $commit $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)" \
      | tee "$W/card.txt"
    python3 -m pip install -q --upgrade --no-deps --target /tmp/gp .gpu-wheel/*.whl 2>&1 | tail -1
    # The 20b checkpoint (+ its 42 GB bf16 reference) is CPU work: start it now, in the background.
    [ -n "${SKIP_SYNTH:-}" ] || setsid bash -c "python3 -m gptoss_3090.cli synth $CK/g20b --preset 20b ${SYNTH_FLAGS:---reference} \
      --quiet > $W/logs/synth20b.log 2>&1; echo rc=\$? >> $W/logs/synth20b.log; touch $CK/synth20b.done" \
      < /dev/null > /dev/null 2>&1 &
    python3 -c "import gptoss_3090, torch; print(gptoss_3090.__version__, torch.__version__)"
  fi
  ;;
start)
  # WAIT_S counts from here, not from the end of the install (15-20 s): a call's limit is
  # the device budget left, and a call killed at its limit packs nothing (session 27, call 3).
  t_start=$(date +%s)
  shift
  jobs=()
  waits=540
  while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then waits=${2:-540}; break; fi
    jobs+=("$1"); shift
  done
  # Whatever part this call carried (the last one); the earlier ones are in /root/stage already.
  cp .gpu-bundle/part-*/* "$STAGE"/ 2>/dev/null
  bash "$STAGE"/install-bundle.sh "$STAGE" /tmp/site 2>&1 | tail -2
  # Extra wheels (carried in .whl, e.g. oss-harmony, which embeds harmony's vocabularies) go
  # first on the path, ahead of the bundle.
  if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-compile --upgrade --target /tmp/gp .whl/*.whl 2>&1 | tail -1
  fi
  vllm_line=$(python3 -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1)
  echo "$vllm_line"
  if [[ $vllm_line != "vllm "* ]]; then
    # Without vLLM every job fails; say so now instead of waiting out WAIT_S.
    echo "vLLM did not install (parts missing or out of order?): nothing queued" | tee -a "$W/status"
    ls -la "$STAGE"
    pack
    exit 1
  fi
  if [ -e "$W/queue.pid" ] && kill -0 "$(cat "$W/queue.pid")" 2> /dev/null; then
    # A queue of an earlier start still runs: a second one would share its status and results,
    # and `wait` would return on the first one's end.
    echo "a queue is still running (pid $(cat "$W/queue.pid")): nothing queued" | tee -a "$W/status"
    exec bash "$0" wait "$(( waits - ($(date +%s) - t_start) ))"
  fi
  rm -f "$W/queue.done"
  # The queue runs detached; its jobs run one after another.
  setsid bash -c "cd $(pwd); for j in ${jobs[*]}; do \
      echo \"\$(date -u +%T) start \$j\" >> $W/status; \
      bash bench/gpu_e2e.sh run \$j > $W/logs/\$j.log 2>&1; \
      echo \"\$(date -u +%T) end \$j rc=\$?\" >> $W/status; done; touch $W/queue.done" \
    < /dev/null > /dev/null 2>&1 &
  echo $! > "$W/queue.pid"
  exec bash "$0" wait "$(( waits - ($(date +%s) - t_start) ))"
  ;;
run)
  # shellcheck disable=SC1091
  [ -e "$W/env" ] && . "$W/env"
  "job_$2"
  ;;
wait)
  limit=${2:-540}
  t0=$(date +%s)
  while [ ! -e "$W/queue.done" ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 5; done
  cat "$W/status" 2>/dev/null
  tail -n 3 "$W/logs/synth20b.log" 2>/dev/null
  for f in "$W"/logs/*.log; do echo "== $f"; tail -n 4 "$f"; done
  pack
  ;;
esac
