#!/usr/bin/env bash
# One device call (~1 min): an ncu profile of the W4A16 kernel at M = 1, 3072 -> 18432 (33 us, ~30% of
# HBM bandwidth): is it latency bound (too few bytes in flight per SM) or instruction bound?
source bench/device_setup.sh
timeout 150 ncu --clock-control none --profile-from-start off --kernel-name regex:_w4a16 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
  python3 bench/profile_kernel.py gemv > "$OUT/ncu_gemv.txt" 2>&1; echo "ncu exit $?"
grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Stall|Issued Warp|Eligible|Compute \(SM\) Throughput" "$OUT/ncu_gemv.txt" | head -60
