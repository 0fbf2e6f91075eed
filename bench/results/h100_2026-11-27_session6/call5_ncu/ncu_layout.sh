#!/bin/bash
# ncu memory counters of moe_str_up, rows vs fragment layout (fragment_layout.patch wheel).
set -u
pip install -q --no-deps --target /tmp/gp .gpu-wheel/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/gp
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
met="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum"
met="$met,lts__t_sector_hit_rate.pct,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_requests_srcunit_tex_op_read.sum"
met="$met,lts__t_sectors_srcunit_tex_op_read_lookup_miss.sum,smsp__issue_active.avg.per_cycle_active,smsp__inst_executed.sum"
met="$met,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__m_xbar2l1tex_read_bytes.sum"
met="$met,regex:smsp__average_warps_issue_stalled_(long_scoreboard|short_scoreboard|wait|barrier|lg_throttle|mio_throttle|drain|membar)_per_issue_active.ratio"
for t in 64 1; do
  for layout in rows fragment; do
    echo "-- T=$t $layout"
    $ncu --graph-profiling node -k regex:moe_str_up -c 1 --metrics "$met" \
      python3 .gpu-variants/bench_moe_layout.py --tokens $t --tunings auto --layers 2 \
      --no-baselines --iters 1 --layout $layout > "$OUT/ncu_t${t}_$layout.txt" 2>&1
    grep -E "^  [a-z]" "$OUT/ncu_t${t}_$layout.txt" | sed 's/  */ /g'
  done
done
