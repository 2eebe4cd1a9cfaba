#!/usr/bin/env bash
# One device call: GPU kernel tests (one autotune config each), an ncu profile of rotate+quantize,
# then the GEMM benchmark (full autotuning). Results under $OUT.
source bench/device_setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
CONVROT_AUTOTUNE=quick python3 -m pytest -q -p no:warnings -x tests/test_kernels_gpu.py tests/test_kernels.py \
  tests/test_cudagraphs.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -5
timeout 120 ncu --clock-control none --profile-from-start off --kernel-name regex:_rotate_quant \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section WarpStateStats --section ComputeWorkloadAnalysis \
  python3 bench/profile_kernel.py rotate > "$OUT/ncu_rotate.txt" 2>&1; echo "ncu exit $?"
grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Shared Memory Configuration Size|Block Limit|Stall|Compute \(SM\) Throughput|Dynamic Shared" "$OUT/ncu_rotate.txt" | head -60
python3 bench/gemm.py --out "$OUT" 2>&1 | grep -v "it/s\]" | tee "$OUT/gemm.log" | tail -32
