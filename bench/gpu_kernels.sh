#!/bin/bash
# One GPU-host call for kernel work (no vLLM needed): installs the carried wheel, then runs the
# named steps in order and leaves logs and JSON in $OUT. Carry .gpu-wheel and COMMIT (and
# .gpu-bnb for the bitsandbytes comparisons).
#
#   bash bench/gpu_kernels.sh moetest moebench moeprofile
#
# Steps:
#   moetest     GPU tests of the MoE op (every kernel variant is checked against fp32 references;
#               MOETEST_K selects tests by pytest -k)
#   nf4test     GPU tests of the NF4 linear / dequantize / quantize ops (NF4TEST_K selects
#               tests by pytest -k)
#   attntest    GPU tests of the attention ops (ATTNTEST_K selects tests by pytest -k)
#   attnbase    bench_attention.py decode at ATTN_CASES (default 1x128,1x256,1x384,1x1024,
#               16x256,16x1024) planned for a 131072-token bound (as vLLM's graphs), with the
#               wheel in .gpu-wheel-base, then the carried one at each of ATTN_MIN_KEYS (default
#               "default 128 64 32": fewest keys per split), then the base again (carry both)
#   attnwrite   bench_attention.py decode at ATTN_CASES (as attnbase) planned for 131072 with
#               --kv-write: kv_cache_write then the attention against the write folded into
#               the decode launch, same process; ATTN_ROUNDS wheels in turn (default head;
#               base* = .gpu-wheel-base)
#   moerouting  bench_moe.py at ROUTING_TOKENS (default 1,2,4,8,16) with the routing given
#               (vLLM's top-k done before the op) or from the router logits (inside the op),
#               for each wheel:routing of ROUTING_RUNS in turn (default head:given head:logits,
#               twice; base = .gpu-wheel-base), tunings MOE_TUNINGS (default auto)
#   router      bench_router.py: the router logits kernel against F.linear (cuBLAS), as vLLM
#               runs GPT-OSS's router, at ROUTER_TOKENS (default 1,2,4,8,16,32,64,128)
#   moebench    bench_moe.py: the default kernels, then the previous defaults on the same card in
#               the same call (lean decode kernels up to 16 tokens, tiled GEMMs above), then the
#               streaming regime against the GEMMs at 256 and 512 tokens
#   moexcols    bench_moe.py up to 128 tokens with the staged activations and without
#               (GPTOSS_3090_STREAM_XCOLS=0)
#   moelaunch   bench_moe.py at VARIANT_TOKENS (default 1-128) with each streaming launch
#               (GPTOSS_3090_MOE_STREAM_LAUNCH = LAUNCHES, default split,fused), twice in
#               turn, tunings MOE_TUNINGS (default auto,sm86)
#   moevariants bench_moe.py at 1, 4, 16 and 64 tokens for each kernel folder in .gpu-variants/
#               (GPTOSS_3090_KERNEL_DIR; carry .gpu-variants too)
#   ablation    the timing-only folders of bench/ablation_variants.py in .gpu-variants/ (carry
#               it), a_head again at the end: moe_kernel_times.py at ABL_TOKENS (default 1,4;
#               4 layers) and linear_kernel_times.py at ABL_MS (default 1,4) on vLLM's q/k/v and
#               o; each folder compiles its kernels once (about 1.5 min on a fresh host)
#   nf4variants bench_nf4_linear.py at M in NF4_MS (default 1,4,16) for each kernel folder in
#               .gpu-variants/ (carry .gpu-variants too)
#   variantcheck variant_check.py: the tree's kernels and each folder in .gpu-variants/, in two
#               alternating rounds (the streaming linear at CHECK_MS, default 1,4,16, and the MoE
#               at CHECK_TOKENS, default 1,4,16,64; CHECK_PARTS, default linear,moe), then each
#               folder's outputs against the tree's, bit for bit; compiles only what it runs;
#               CHECK_TUNING=sm86 runs every folder under a 3090's configuration
#               (GPTOSS_3090_FORCE_TUNING)
#   moeskew     bench_moe.py at SKEW_TOKENS (default 16,32,64,128) with each routing skew of
#               MOE_SKEWS (default "0 0.35"; --routing-skew), each with
#               GPTOSS_3090_MOE_PASS_ITEMS set to each of PASS_ITEMS_RUNS (default "0 1 0 1":
#               one block row per expert or per pass, twice in turn); our kernels only (the
#               Marlin baseline needs vLLM: gpu_e2e.sh job kernels_skew)
#   moechunks   bench_moe.py on row-order experts, then on chunk-major ones (the served order)
#   nf4chunks   bench_nf4_linear.py at M = 1, 4, 16: the default kernels, then the streaming
#               kernels built with STR_CHUNK_MAJOR on chunk-major weights
#   moegemm     bench_moe.py at GEMM_TOKENS with each prefill GEMM variant (MOE_GEMMS)
#   moeks       bench_moe.py at KS_TOKENS (default 1,4,16,64) with each forced K split, then
#               the automatic split
#   moeprofile  ncu of the streaming kernels (PROFILE_KERNELS regex, PROFILE_COUNT launches) at
#               PROFILE_TOKENS (default 1 4 16 64); bench_moe.py first checks the kernels at 64
#               tokens, so a regex that matches the _n2 kernels profiles that check
#   moesass     ncu source counters of the streaming kernels: warp-stall samples and executed
#               instructions per SASS instruction (CSV per token count; PROFILE_TOKENS)
#   nf4bench    bench_nf4_linear.py on the issue's shapes (NF4_SHAPES, NF4_MS, NF4_TUNINGS)
#   moetiles    bench_moe.py with the streaming kernels forced to 1 and to 2 column tiles per
#               pass (TILES_TOKENS)
#   moetimes    moe_kernel_times.py: each MoE kernel's time per layer (torch.profiler), also
#               with forced K splits (TIMES_KS) at 1, 4 and 64 tokens
#   dram        dram_pattern.py: DRAM bandwidth of the streaming MoE's weight order vs chunk-major
#   nf4base     bench_nf4_linear.py at M in NF4_MS (default 32,64,128,256) on NF4_SHAPES
#               (default the q/k/v and o shapes; 4096+512+512x2880 = vLLM's q/k/v as three
#               segments) with the wheel in .gpu-wheel-base, then the carried one (carry both)
#   moebase     bench_moe.py at VARIANT_TOKENS (default 1-128) with the wheel in .gpu-wheel-base,
#               then the carried one, twice in alternation (carry both)
#   moewheels   bench_moe.py at VARIANT_TOKENS with each wheel in .gpu-wheels/<name>/, all of them
#               in turn, twice (carry .gpu-wheels): patches that change Rust launch choices too
#   nf4wheels   bench_nf4_linear.py at NF4_MS (default 1,4,16) on NF4_SHAPES (default vLLM's
#               q/k/v and o, and 5760x2880) with each wheel in .gpu-wheels/, twice in turn
#   sass        ncu source counters of kernel SASS_KERNEL (regex) under SASS_CMD, named SASS_NAME
#   floor       read_floor.py: an empty kernel, a pure read and a copy of the decode targets'
#               weight sizes, timed as the benchmarks time ours
#   nf4grid     bench_nf4_linear.py (ours and cuBLAS) at NF4_MS (default 33,48,64) for each
#               variant/splits of NF4_GRID (e.g. "tree/auto base/auto mine/3"; variants are
#               folders of .gpu-variants/), NF4_ROUNDS rounds (default 2)
#   reducevec   bench_nf4_linear.py at NF4_MS (default 33,48,64,128,256) on NF4_SHAPES (vLLM's
#               q/k/v as three segments, o, 5760x2880) with GPTOSS_3090_SPLITK_REDUCE set to
#               each of REDUCE_RUNS in turn (default "scalar vec scalar vec")
#   pdl         programmatic dependent launch off and on (GPTOSS_3090_PDL, PDL_RUNS, default
#               "off on off on"): bench_moe.py at PDL_TOKENS (default 1,2,4,8,16,64) and
#               bench_nf4_linear.py (ours and cuBLAS) at NF4_MS (default 1,4,16,48,64) on vLLM's
#               q/k/v and o; both time back-to-back calls of our own kernels, so the previous
#               kernel is always one of ours
#   widereduce  the wide linear at NF4_MS (default 33,48,64) on NF4_SHAPES (vLLM's q/k/v as
#               three segments, o, 5760x2880) with GPTOSS_3090_WIDE_REDUCE set to each of
#               WIDE_RUNS in turn (default "launch cluster launch cluster": the K split summed
#               by a reduce launch, or inside thread-block clusters on sm_90):
#               bench_nf4_linear.py (ours and cuBLAS), then linear_kernel_times.py per kernel
#   deepring    bench_moe.py at DEEP_TOKENS (default 1,2,4) with the split streaming launches and
#               GPTOSS_3090_MOE_DEEP_RING set to each of DEEP_RUNS in turn (default "off on off
#               on": the one-tile kernels with four weight stages per warp, or the deep-ring
#               ones with seven on sm_90), tunings MOE_TUNINGS (default auto); FOREIGN=1 puts a
#               torch kernel before each layer (bench_moe.py --foreign-kernel), as in vLLM
#   foldcombine bench_moe.py at FOLD_TOKENS (default 1,2,4) with the split streaming launches
#               (GPTOSS_3090_MOE_STREAM_LAUNCH=split) and GPTOSS_3090_MOE_FOLD_COMBINE set to
#               each of FOLD_RUNS in turn (default "off on off on": a moe_combine launch, or
#               the down launch's last block per column sums the outputs), tunings MOE_TUNINGS
#               (default auto,sm86); FOREIGN=1 as in deepring
#   moepdl      bench_moe.py at MOEPDL_TOKENS (default 1) with the split streaming launches, for
#               each PDL:FOLD pair of MOEPDL_RUNS in turn (default "off:auto on:off on:auto",
#               twice): GPTOSS_3090_PDL and GPTOSS_3090_MOE_FOLD_COMBINE; FOREIGN=1 as in
#               deepring (vLLM's batch-1 trace found the folded down slower there, session 26)
#   nf4stream   sweep_nf4_mma.py: the streaming linear at M in NF4_MS (default 17-32) against
#               auto, the tensor-core kernel and dequantize + cuBLAS, each forced K split
#               (STREAM_KS, default 1 2 4 8) after the automatic one
#   nf4sweep    sweep_nf4_mma.py: forced tensor-core tiles x forced K splits (NF4_SPLITS) at
#               M in NF4_MS (default 32,64,128) on the q/k/v and o shapes
# Everything lands in $OUT/kernels.tgz (the device tool returns only a few files).
set -u
FINAL=${OUT:-/tmp/out}
OUT=/root/kern
mkdir -p "$OUT" "$FINAL"
trap 'tar czf "$FINAL/kernels.tgz" -C "$OUT" .' EXIT
export PYTHONPATH=/tmp/gp PYTHONUNBUFFERED=1
pip install -q --no-deps --upgrade --target /tmp/gp .gpu-wheel/*.whl > "$OUT/pip.log" 2>&1
# bitsandbytes, where carried (scripts/slim-bnb-wheel.sh makes .gpu-bnb): the GPU tests then
# compare with its CUDA quantizer and dequantizer, and nf4bench times its 4-bit kernels.
if compgen -G ".gpu-bnb/*.whl" > /dev/null; then
  pip install -q --no-deps --target /tmp/gp .gpu-bnb/*.whl >> "$OUT/pip.log" 2>&1
fi
commit=$(cat COMMIT 2>/dev/null || echo unknown)
# The device copy's git metadata can be stale: benchmarks record the wheel's commit instead.
export GPTOSS_3090_GIT_COMMIT=$commit
{ date -u; echo "commit $commit"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } \
  | tee "$OUT/card.txt"

install_base_wheel() {  # .gpu-wheel-base into /tmp/gp_base (moebase, nf4base)
  mkdir -p /tmp/gp_base
  pip install -q --no-deps --upgrade --target /tmp/gp_base .gpu-wheel-base/*.whl >> "$OUT/pip.log" 2>&1
}

install_wheels() {  # each .gpu-wheels/<name>/*.whl into /tmp/gpw/<name> (moewheels, nf4wheels)
  local d
  for d in .gpu-wheels/*/; do
    [ -d "/tmp/gpw/$(basename "$d")" ] && continue
    mkdir -p "/tmp/gpw/$(basename "$d")"
    pip install -q --no-deps --target "/tmp/gpw/$(basename "$d")" "$d"*.whl >> "$OUT/pip.log" 2>&1
  done
}

# Runs "$1 WHEEL ROUND DIR" for each wheel installed by install_wheels, all in turn, twice (so
# that drift between the rounds shows).
each_wheel_twice() {
  local round d
  for round in 1 2; do
    for d in /tmp/gpw/*/; do
      echo "-- wheel $(basename "$d"), round $round"
      "$1" "$(basename "$d")" "$round" "$d"
    done
  done
}

moe_wheel() {  # wheel, round, its install folder (moewheels)
  PYTHONPATH=$3 bench_moe "wheel_$1_$2" --tokens "${VARIANT_TOKENS:-1,2,4,8,16,32,64,128}" \
    --tunings "${MOE_TUNINGS:-auto}" --no-baselines
}

nf4_wheel() {  # wheel, round, its install folder (nf4wheels)
  PYTHONPATH=$3 python3 bench/bench_nf4_linear.py --shapes "${NF4_SHAPES:-5120x2880,2880x4096,5760x2880}" \
    --ms "${NF4_MS:-1,4,16}" --tunings "${NF4_TUNINGS:-auto}" --no-bnb \
    --out "$OUT/nf4_wheel_$1_$2.json" 2>&1 | tee "$OUT/nf4_wheel_$1_$2.log" | grep -v "^wrote"
}

bench_moe() {  # name, then bench_moe.py arguments
  local name=$1
  shift
  python3 bench/bench_moe.py --layers 24 --commit "$commit" --out "$OUT/moe_$name.json" "$@" \
    2>&1 | tee "$OUT/moe_$name.log" | grep -v "^wrote"
}

# bench_moe over the split streaming launches, our kernels only (the knob A/B steps deepring and
# foldcombine); FOREIGN=1 adds --foreign-kernel.
bench_moe_split() {  # name, tokens, tunings
  # shellcheck disable=SC2086  # an optional flag
  GPTOSS_3090_MOE_STREAM_LAUNCH=split bench_moe "$1" --tokens "$2" --tunings "$3" \
    --no-baselines ${FOREIGN:+--foreign-kernel}
}

bench_linear() {  # name, then bench_nf4_linear.py arguments (bitsandbytes left out)
  local name=$1
  shift
  python3 bench/bench_nf4_linear.py --no-bnb --out "$OUT/$name.json" "$@" 2>&1 \
    | tee "$OUT/$name.log" | grep -v "^wrote"
}

# Same-call A/B of a knob: runs "$3 MODE ROUND" for each word MODE of $2 in turn, with the
# environment variable $1 set to MODE (ROUND counts from 1).
knob_rounds() {
  local var=$1 runs=$2 step=$3 mode round=0
  for mode in $runs; do
    round=$((round + 1))
    echo "-- $var=$mode (run $round)"
    (export "$var=$mode"; "$step" "$mode" "$round")
  done
}

# ncu source counters of one launch of kernels matching $2 while the command $4... runs, with
# the extra ncu sections $3; exports the per-SASS CSV, the details page and their summary to
# $1.{csv,txt,summary.txt}.
ncu_sass() {
  local rep=$1 kernel=$2 extra=$3
  shift 3
  local ncu=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
  # shellcheck disable=SC2086  # $extra is a list of ncu options
  $ncu --graph-profiling node -k regex:"$kernel" -c 1 --import-source no \
    --section SourceCounters --section WarpStateStats --section SchedulerStats \
    --section InstructionStats --section Occupancy --section LaunchStats $extra -o "$rep" -f \
    "$@" > "$rep.log" 2>&1
  $ncu --import "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.csv" 2> "$rep.err" \
    || $ncu --import "$rep.ncu-rep" --page source --csv > "$rep.csv" 2>> "$rep.err"
  $ncu --import "$rep.ncu-rep" --page details > "$rep.txt" 2>&1
  python3 bench/ncu_sass_summary.py "$rep.csv" > "$rep.summary.txt" 2>&1
}

# Kernel sources of this tree built with STR_CHUNK_MAJOR (chunk-major weights in the streaming
# kernels of the MoE and the linear), in /tmp/kchunks for GPTOSS_3090_KERNEL_DIR.
chunk_kernels() {
  rm -rf /tmp/kchunks && mkdir -p /tmp/kchunks && cp kernels/*.cu kernels/common.cuh /tmp/kchunks/
  sed -i '1i #define STR_CHUNK_MAJOR 1' /tmp/kchunks/moe.cu /tmp/kchunks/nf4.cu
}

for step in "$@"; do
  echo "== $step ($(date -u +%T))"
  case $step in
    moetest)
      # MOETEST_K: a pytest -k expression, to run part of the file.
      python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_moe_gpu.py -s \
        ${MOETEST_K:+-k "$MOETEST_K"} > "$OUT/test_moe_gpu.log" 2>&1
      grep -E "passed|failed|error|rel err|vs fp32" "$OUT/test_moe_gpu.log" | tail -40
      ;;
    nf4test)
      python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_nf4_gpu.py \
        ${NF4TEST_K:+-k "$NF4TEST_K"} > "$OUT/test_nf4_gpu.log" 2>&1
      tail -5 "$OUT/test_nf4_gpu.log"
      ;;
    attntest)
      python3 -m pytest -q -rfEs -p no:cacheprovider tests/gpu/test_attention_gpu.py \
        ${ATTNTEST_K:+-k "$ATTNTEST_K"} > "$OUT/test_attention_gpu.log" 2>&1
      tail -5 "$OUT/test_attention_gpu.log"
      ;;
    attnbase)
      install_base_wheel
      for w in base ${ATTN_MIN_KEYS:-default 128 64 32} base2; do
        gp=/tmp/gp
        opts=()
        case $w in
          base*) gp=/tmp/gp_base ;;
          default) ;;
          *) opts=(--min-keys "$w") ;;
        esac
        echo "-- wheel/min keys: $w"
        PYTHONPATH=$gp python3 bench/bench_attention.py --only decode --seq-bound 131072 \
          --decode-cases "${ATTN_CASES:-1x128,1x256,1x384,1x1024,16x256,16x1024}" "${opts[@]}" \
          --out "$OUT/attn_$w.json" 2>&1 | tee "$OUT/attn_$w.log" | grep -v "^wrote"
      done
      ;;
    attnwrite)
      # ATTN_ROUNDS (default "head"): wheels in turn, base* = .gpu-wheel-base (carry it).
      for w in ${ATTN_ROUNDS:-head}; do
        gp=/tmp/gp
        case $w in base*) install_base_wheel; gp=/tmp/gp_base ;; esac
        echo "-- wheel $w"
        PYTHONPATH=$gp python3 bench/bench_attention.py --only decode --seq-bound 131072 \
          --kv-write --decode-cases "${ATTN_CASES:-1x128,1x256,1x384,1x1024,16x256,16x1024,64x512}" \
          --out "$OUT/attn_write_$w.json" 2>&1 | tee "$OUT/attn_write_$w.log" | grep -v "^wrote"
      done
      ;;
    moerouting)
      # ROUTING_RUNS: wheel:routing items in order (wheel head or base = .gpu-wheel-base).
      n=0
      for run in ${ROUTING_RUNS:-head:given head:logits head:given head:logits}; do
        w=${run%%:*} routing=${run#*:} n=$((n + 1)) gp=/tmp/gp
        [ "$w" = base ] && { install_base_wheel; gp=/tmp/gp_base; }
        echo "-- $n: wheel $w, routing $routing"
        PYTHONPATH=$gp bench_moe "routing_${n}_${w}_$routing" \
          --tokens "${ROUTING_TOKENS:-1,2,4,8,16}" --tunings "${MOE_TUNINGS:-auto}" \
          --no-baselines --routing "$routing"
      done
      ;;
    router)
      python3 bench/bench_router.py --tokens "${ROUTER_TOKENS:-1,2,4,8,16,32,64,128}" \
        --out "$OUT/router.json" 2>&1 | tee "$OUT/router.log" | grep -v "^wrote"
      ;;
    moebench)
      bench_moe default --tokens 1,2,4,8,16,32,64,128 --tunings auto,sm86 --no-baselines
      GPTOSS_3090_MOE_DECODE=2 GPTOSS_3090_MOE_STREAM_MAX_TOKENS=16 \
        bench_moe previous --tokens 1,2,4,8,16,32,64,128 --tunings auto --no-baselines \
        --weights-order rows
      GPTOSS_3090_MOE_STREAM_MAX_TOKENS=1024 \
        bench_moe stream_large --tokens 256,512 --tunings auto --no-baselines
      bench_moe gemm_large --tokens 256,512 --tunings auto --no-baselines
      ;;
    moexcols)
      # Activations staged in shared memory (the default) against global loads, same call.
      bench_moe xcols_default --tokens 1,2,4,8,16,32,64,128 --tunings auto,sm86 --no-baselines
      GPTOSS_3090_STREAM_XCOLS=0 \
        bench_moe xcols_0 --tokens 1,2,4,8,16,32,64,128 --tunings auto --no-baselines
      ;;
    moelaunch)
      for round in 1 2; do
        for launch in $(echo "${LAUNCHES:-split,fused}" | tr , ' '); do
          echo "-- $launch, round $round"
          GPTOSS_3090_MOE_STREAM_LAUNCH=$launch bench_moe "${launch}_$round" \
            --tokens "${VARIANT_TOKENS:-1,2,4,8,16,32,64,128}" \
            --tunings "${MOE_TUNINGS:-auto,sm86}" --no-baselines
        done
      done
      ;;
    moevariants)
      for d in .gpu-variants/${MOE_VARIANTS:-*}/; do
        v=$(basename "$d")
        echo "-- variant $v"
        GPTOSS_3090_KERNEL_DIR=$d bench_moe "variant_$v" --tokens "${VARIANT_TOKENS:-1,4,16,64}" \
          --tunings auto --no-baselines
      done
      ;;
    ablation)
      round=0
      for d in .gpu-variants/*/ .gpu-variants/a_head/; do
        v=$(basename "$d")
        round=$((round + 1))
        echo "-- $round $v"
        GPTOSS_3090_KERNEL_DIR=$(realpath "$d") python3 bench/moe_kernel_times.py \
          --tokens "${ABL_TOKENS:-1,4}" --layers 4 --out "$OUT/abl_moe_${round}_$v.json" \
          > "$OUT/abl_moe_${round}_$v.log" 2>&1
        grep -E "^T=|moe_str" "$OUT/abl_moe_${round}_$v.log"
        GPTOSS_3090_KERNEL_DIR=$(realpath "$d") python3 bench/linear_kernel_times.py \
          --shapes 4096+512+512x2880,2880x4096 --ms "${ABL_MS:-1,4}" \
          > "$OUT/abl_linear_${round}_$v.log" 2>&1
        grep " M=" "$OUT/abl_linear_${round}_$v.log"
      done
      ;;
    variantcheck)
      rm -rf /tmp/kbase && mkdir -p /tmp/kbase && cp kernels/*.cu kernels/common.cuh /tmp/kbase/
      for round in 1 2; do
        for d in /tmp/kbase/ .gpu-variants/*/; do
          v=$(basename "$d")
          [ "$v" = kbase ] && v=base
          GPTOSS_3090_FORCE_TUNING=${CHECK_TUNING:-} GPTOSS_3090_KERNEL_DIR=$(realpath "$d") \
            python3 bench/variant_check.py run "$v$round" \
            --out "$OUT/variants" --parts "${CHECK_PARTS:-linear,moe}" \
            --linear-ms "${CHECK_MS:-1,4,16}" --moe-tokens "${CHECK_TOKENS:-1,4,16,64}" 2>&1 \
            | tee -a "$OUT/variantcheck.log"
        done
      done
      for d in .gpu-variants/*/; do
        v=$(basename "$d")
        echo "-- $v against the tree's kernels" | tee -a "$OUT/variantcheck.log"
        python3 bench/variant_check.py compare "$OUT/variants/base1.pt" "$OUT/variants/${v}1.pt" \
          2>&1 | tee -a "$OUT/variantcheck.log"
      done
      rm -rf "$OUT/variants"
      ;;
    nf4variants)
      for d in .gpu-variants/${NF4_VARIANTS:-*}/; do
        v=$(basename "$d")
        echo "-- variant $v"
        GPTOSS_3090_KERNEL_DIR=$d python3 bench/bench_nf4_linear.py --shapes 5760x2880,4096x2880,2880x2880 \
          --ms "${NF4_MS:-1,4,16}" --tunings "${NF4_TUNINGS:-auto}" --no-bnb --out "$OUT/nf4_variant_$v.json" 2>&1 \
          | tee "$OUT/nf4_variant_$v.log" | grep -v "^wrote"
      done
      ;;
    moeskew)
      round=0
      for items in ${PASS_ITEMS_RUNS:-0 1 0 1}; do
        round=$((round + 1))
        for sk in ${MOE_SKEWS:-0 0.35}; do
          echo "-- routing skew $sk, GPTOSS_3090_MOE_PASS_ITEMS=$items (run $round)"
          GPTOSS_3090_MOE_PASS_ITEMS=$items bench_moe "skew_${sk}_items${items}_$round" \
            --tokens "${SKEW_TOKENS:-16,32,64,128}" --tunings auto --routing-skew "$sk" \
            --no-baselines
        done
      done
      ;;
    moechunks)
      # The MoE on row-order weights (kernel family moe) against chunk-major ones (moe_chunks,
      # what the vLLM plugin serves), same call.
      for order in rows chunks; do
        echo "-- weights in $order order"
        bench_moe "order_$order" \
          --tokens "${VARIANT_TOKENS:-1,2,4,8,16,32,64,128,512,2048,8192}" --tunings auto \
          --no-baselines --weights-order $order
      done
      ;;
    nf4chunks)
      # The same for the NF4 linear's streaming kernels (M <= 16).
      chunk_kernels
      for order in rows chunks; do
        dir=""
        [ $order = chunks ] && dir=/tmp/kchunks
        echo "-- weights in $order order"
        GPTOSS_3090_KERNEL_DIR=$dir python3 bench/bench_nf4_linear.py \
          --shapes 5760x2880,4096x2880,2880x4096 --ms 1,4,16 --tunings auto,sm86 --no-bnb \
          --weights-order $order --out "$OUT/nf4_order_$order.json" 2>&1 \
          | tee "$OUT/nf4_order_$order.log" | grep -v "^wrote"
      done
      ;;
    moegemm)
      # The prefill GEMM variants (GPTOSS_3090_MOE_GEMM), same call.
      for g in ${MOE_GEMMS:-m64s2 m128s2 m128s4}; do
        echo "-- GPTOSS_3090_MOE_GEMM=$g"
        GPTOSS_3090_MOE_GEMM=$g bench_moe "gemm_$g" --tokens "${GEMM_TOKENS:-256,512,2048,8192}" \
          --tunings auto --no-baselines
      done
      ;;
    moeks)
      for ks in 1 2 4 8; do
        echo "-- GPTOSS_3090_MOE_STREAM_KS=$ks"
        GPTOSS_3090_MOE_STREAM_KS=$ks bench_moe "ks$ks" --tokens "${KS_TOKENS:-1,4,16,64}" \
          --tunings auto --no-baselines
      done
      echo "-- automatic split"
      bench_moe ks_auto --tokens "${KS_TOKENS:-1,4,16,64}" --tunings auto --no-baselines
      ;;
    moeprofile)
      # Stall reasons of the gate_up streaming kernel at 1, 4, 16 and 64 tokens.
      ncu=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
      met="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed"
      met="$met,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.per_cycle_active"
      met="$met,smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts.sum,launch__registers_per_thread"
      met="$met,dram__bytes_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,l1tex__t_sector_hit_rate.pct"
      met="$met,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
      for t in ${PROFILE_TOKENS:-1 4 16 64}; do
        # shellcheck disable=SC2086
        $ncu --graph-profiling node -k regex:"${PROFILE_KERNELS:-moe_str_up}" -c "${PROFILE_COUNT:-1}" --metrics "$met" \
          python3 bench/bench_moe.py --tokens $t --tunings auto --layers 2 --no-baselines \
          --iters 1 > "$OUT/ncu_t$t.txt" 2>&1
        echo "-- T=$t"
        grep -E "moe_|duration|dram__|lts__|l1tex__t_sector|warps_active|issue_active|inst_executed|wavefronts|registers" "$OUT/ncu_t$t.txt" | sed 's/  */ /g'
        grep -E "stalled" "$OUT/ncu_t$t.txt" | awk '$NF+0 >= 0.3' | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//; s/  */ /g'
      done
      ;;
    moesass)
      # Which SASS instructions the warps stall on (source counters), per kernel and token count.
      for t in ${PROFILE_TOKENS:-1 16 64}; do
        for k in ${PROFILE_KERNELS:-moe_str_up moe_str_down}; do
          rep="$OUT/sass_${k}_t$t"
          ncu_sass "$rep" "$k" "" python3 bench/bench_moe.py --tokens "$t" --tunings auto \
            --layers 2 --no-baselines --iters 1
          head -16 "$rep.summary.txt"
          echo "-- $k T=$t: $(wc -l < "$rep.csv") csv lines"
          grep -E "Duration|Issued Ipc|Warp Cycles Per Issued|Achieved Occupancy|Executed Instructions  " "$rep.txt" | sed 's/  */ /g'
        done
      done
      ;;
    sass)
      # Source counters of one launch of the kernels matching SASS_KERNEL while SASS_CMD runs
      # (a python3 command line), for kernels other than the MoE streaming ones.
      rep="$OUT/sass_${SASS_NAME:-kernel}"
      # shellcheck disable=SC2086  # SASS_CMD is a command line
      ncu_sass "$rep" "$SASS_KERNEL" "--section SpeedOfLight --section MemoryWorkloadAnalysis" \
        $SASS_CMD
      head -40 "$rep.summary.txt"
      grep -E "Duration|Issued Ipc|Warp Cycles Per Issued|Achieved Occupancy|Memory Throughput|Compute \(SM\)|Registers Per|Block Limit" "$rep.txt" | sed 's/  */ /g'
      ;;
    nf4sweep)
      # The linear's tensor-core tiles at medium M, each forced K split in its own process.
      for s in "" ${NF4_SPLITS:-1 2 4 8}; do
        GPTOSS_3090_NF4_SPLITS=$s python3 bench/sweep_nf4_mma.py --ms "${NF4_MS:-32,64,128}" \
          2>&1 | tee -a "$OUT/nf4_sweep.log"
      done
      ;;
    floor)
      # The read floor of a kernel at the weight sizes the decode targets measure.
      python3 bench/read_floor.py --out "$OUT/read_floor.json" 2>&1 | tee "$OUT/read_floor.log"
      ;;
    nf4stream)
      # The streaming linear with 4 token tiles (M = 17..32) against the tensor-core kernel and
      # dequantize + cuBLAS, each forced K split (STREAM_KS) in its own process.
      for ks in "" ${STREAM_KS:-1 2 4 8}; do
        GPTOSS_3090_MOE_STREAM_KS=$ks python3 bench/sweep_nf4_mma.py \
          --ms "${NF4_MS:-17,24,32}" --paths "${NF4_PATHS:-auto,mma,dequant_matmul,stream}" \
          2>&1 | tee -a "$OUT/nf4_stream.log"
        NF4_PATHS=stream  # the other paths do not depend on the split
      done
      ;;
    moetiles)
      # The streaming kernels with one 8-column tile per pass (n1) against two (n2), forced
      # (GPTOSS_3090_MOE_STREAM_TILES), same call.
      for tiles in 1 2; do
        echo "-- GPTOSS_3090_MOE_STREAM_TILES=$tiles"
        GPTOSS_3090_MOE_STREAM_TILES=$tiles bench_moe "tiles$tiles" \
          --tokens "${TILES_TOKENS:-4,8,9,12,16,24,32,48,64,96,128}" --tunings auto,sm86 \
          --no-baselines
      done
      ;;
    moetimes)
      # Per-kernel times of the MoE layer (torch.profiler), then with each forced K split of the
      # streaming kernels at the smallest token counts.
      python3 bench/moe_kernel_times.py --tokens "${TIMES_TOKENS:-1,2,4,8,16,32,64,128}" \
        --out "$OUT/moe_times.json" 2>&1 | tee "$OUT/moe_times.log"
      for ks in ${TIMES_KS:-1 2 4}; do
        echo "-- GPTOSS_3090_MOE_STREAM_KS=$ks"
        GPTOSS_3090_MOE_STREAM_KS=$ks python3 bench/moe_kernel_times.py --tokens 1,4,64 \
          --out "$OUT/moe_times_ks$ks.json" 2>&1 | tee "$OUT/moe_times_ks$ks.log"
      done
      ;;
    dram)
      # The streaming MoE's weight order against a chunk-major order, reads only (Triton): one
      # program per group, then 16 persistent warps per SM (the kernels' bytes in flight) with
      # 4 and 8 stages.
      for opts in "" "--programs-per-sm 16" "--programs-per-sm 16 --stages 8"; do
        # shellcheck disable=SC2086  # $opts is a list of options
        python3 bench/dram_pattern.py $opts 2>&1 | tee -a "$OUT/dram_pattern.log"
      done
      ;;
    nf4base)
      # The linear on the q/k/v and o shapes with a baseline wheel (.gpu-wheel-base: its Rust
      # launch choices and kernels) and then the carried wheel, same call.
      install_base_wheel
      for w in ${NF4_ROUNDS:-base head}; do  # e.g. NF4_ROUNDS="base head base2 head2"
        gp=/tmp/gp
        case $w in base*) gp=/tmp/gp_base ;; esac
        echo "-- wheel $w"
        PYTHONPATH=$gp python3 bench/bench_nf4_linear.py \
          --shapes "${NF4_SHAPES:-5760x2880,5120x2880,2880x4096,4096x2880}" \
          --ms "${NF4_MS:-32,64,128,256}" --tunings "${NF4_TUNINGS:-auto,sm86}" --no-bnb \
          --out "$OUT/nf4_wheel_$w.json" 2>&1 | tee "$OUT/nf4_wheel_$w.log" | grep -v "^wrote"
      done
      ;;
    moebase)
      # The MoE layer with a baseline wheel (.gpu-wheel-base: its Rust launch choices and
      # kernels) and then the carried wheel, twice in alternation (base, head, base, head) so
      # that drift shows, same call.
      install_base_wheel
      for w in base head base2 head2; do
        gp=/tmp/gp
        case $w in base*) gp=/tmp/gp_base ;; esac
        echo "-- wheel $w"
        PYTHONPATH=$gp bench_moe "wheel_$w" --tokens "${VARIANT_TOKENS:-1,2,4,8,16,32,64,128}" \
          --tunings "${MOE_TUNINGS:-auto}" --no-baselines
      done
      ;;
    moewheels)
      install_wheels
      each_wheel_twice moe_wheel
      ;;
    nf4wheels)
      install_wheels
      each_wheel_twice nf4_wheel
      ;;
    nf4grid)
      # The linear at NF4_MS (default 33,48,64) on NF4_SHAPES (default vLLM's q/k/v as three
      # segments, o, 5760x2880) for each VARIANT/SPLITS of NF4_GRID in turn, NF4_ROUNDS times
      # (default 2): VARIANT is a folder of .gpu-variants/ (kernel sources for
      # GPTOSS_3090_KERNEL_DIR) or "tree", SPLITS a forced GPTOSS_3090_NF4_SPLITS or "auto".
      # Ours and cuBLAS only (--no-other-paths), one process per entry.
      for round in $(seq "${NF4_ROUNDS:-2}"); do
        for run in ${NF4_GRID:-tree/auto}; do
          v=${run%/*} s=${run#*/} kd=$PWD/kernels
          if [ "$v" != tree ]; then
            [ -d ".gpu-variants/$v" ] || { echo "nf4grid: no folder .gpu-variants/$v (carry it)"; continue; }
            kd=$(realpath ".gpu-variants/$v")
          fi
          [ "$s" = auto ] && s=
          echo "-- $run (round $round)"
          GPTOSS_3090_KERNEL_DIR=$kd GPTOSS_3090_NF4_SPLITS=$s python3 bench/bench_nf4_linear.py \
            --shapes "${NF4_SHAPES:-4096+512+512x2880,2880x4096,5760x2880}" \
            --ms "${NF4_MS:-33,48,64}" --tunings "${NF4_TUNINGS:-auto}" --no-bnb --quick \
            --no-other-paths --out "$OUT/nf4grid_${v}_${run#*/}_$round.json" 2>&1 \
            | tee "$OUT/nf4grid_${v}_${run#*/}_$round.log" | grep -v "^wrote\|^#"
        done
      done
      ;;
    reducevec)
      # The split-K reduce after the wide linear (sm90 tunings, M = 33-64) and after the
      # tensor-core path (the sm86 tuning from M = 17): one output per thread, then four
      # (GPTOSS_3090_SPLITK_REDUCE=vec), in turn (REDUCE_RUNS, default twice each), same call.
      # tests/gpu/test_nf4_gpu.py checks that the two give the same bits.
      reducevec_run() {
        bench_linear "nf4_reduce_$1_$2" \
          --shapes "${NF4_SHAPES:-4096+512+512x2880,2880x4096,5760x2880}" \
          --ms "${NF4_MS:-33,48,64,128,256}" --tunings "${NF4_TUNINGS:-auto,sm86}"
      }
      knob_rounds GPTOSS_3090_SPLITK_REDUCE "${REDUCE_RUNS:-scalar vec scalar vec}" reducevec_run
      ;;
    pdl)
      pdl_run() {
        bench_moe "pdl_$1_$2" --tokens "${PDL_TOKENS:-1,2,4,8,16,64}" --tunings auto --no-baselines
        bench_linear "pdl_linear_$1_$2" --shapes "${NF4_SHAPES:-4096+512+512x2880,2880x4096}" \
          --ms "${NF4_MS:-1,4,16,48,64}" --tunings auto --quick --no-other-paths
      }
      knob_rounds GPTOSS_3090_PDL "${PDL_RUNS:-off on off on}" pdl_run
      ;;
    deepring)
      deepring_run() {
        bench_moe_split "deep_$1_$2" "${DEEP_TOKENS:-1,2,4}" "${MOE_TUNINGS:-auto}"
      }
      knob_rounds GPTOSS_3090_MOE_DEEP_RING "${DEEP_RUNS:-off on off on}" deepring_run
      ;;
    moepdl)
      # Modes are PDL:FOLD pairs (GPTOSS_3090_PDL, GPTOSS_3090_MOE_FOLD_COMBINE).
      moepdl_run() {
        GPTOSS_3090_PDL=${1%%:*} GPTOSS_3090_MOE_FOLD_COMBINE=${1##*:} \
          bench_moe_split "pdl${FOREIGN:+_foreign}_${1/:/_fold_}_$2" "${MOEPDL_TOKENS:-1}" "${MOE_TUNINGS:-auto}"
      }
      knob_rounds MOEPDL "${MOEPDL_RUNS:-off:auto on:off on:auto off:auto on:off on:auto}" \
        moepdl_run
      ;;
    foldcombine)
      foldcombine_run() {
        bench_moe_split "fold_$1_$2" "${FOLD_TOKENS:-1,2,4}" "${MOE_TUNINGS:-auto,sm86}"
      }
      knob_rounds GPTOSS_3090_MOE_FOLD_COMBINE "${FOLD_RUNS:-off on off on}" foldcombine_run
      ;;
    widereduce)
      widereduce_run() {
        local shapes=${NF4_SHAPES:-4096+512+512x2880,2880x4096,5760x2880} ms=${NF4_MS:-33,48,64}
        bench_linear "wide_$1_$2" --shapes "$shapes" --ms "$ms" --tunings auto --quick \
          --no-other-paths
        python3 bench/linear_kernel_times.py --shapes "$shapes" --ms "$ms" \
          --out "$OUT/wide_kernels_$1_$2.json" 2>&1 | tee "$OUT/wide_kernels_$1_$2.log"
      }
      knob_rounds GPTOSS_3090_WIDE_REDUCE "${WIDE_RUNS:-launch cluster launch cluster}" \
        widereduce_run
      ;;
    nf4bench)
      # bitsandbytes' kernels as a baseline too when .gpu-bnb was carried (bench_nf4_linear.py
      # finds out whether it imports with CUDA).
      python3 bench/bench_nf4_linear.py \
        --shapes "${NF4_SHAPES:-5760x2880,2880x2880,4096x2880,2880x4096,512x2880}" \
        --ms "${NF4_MS:-1,4,16,64,256,2048}" --tunings "${NF4_TUNINGS:-auto,sm86}" \
        --out "$OUT/nf4_linear.json" 2>&1 | tee "$OUT/nf4_linear.log"
      ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "== done ($(date -u +%T))"
