#!/bin/bash
# Nsight Compute over benchmarks/profile_linear_recurrent.py on the GPU machine (ncu reads the counters on its
# Firecracker machines; clocks left alone). Writes to $OUT: kernel_times.csv (every kernel's duration, XLA glue
# included) and pallas_kernels.txt (the Pallas kernels: speed of light, occupancy, launch, warp stall reasons
# per issued instruction, the SASS lines with the most stall samples).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_FLAGS="--xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer="
OUT=${OUT:-/tmp}
NCU="ncu --clock-control none --target-processes all"
timeout ${TIMES_S:-200} $NCU --metrics gpu__time_duration.sum --csv \
  python benchmarks/profile_linear_recurrent.py > "$OUT/kernel_times.csv" 2> "$OUT/kernel_times.err"
timeout ${DETAIL_S:-300} $NCU -k 'regex:vector_gate|delta' --import-source no \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats --section SourceCounters --section MemoryWorkloadAnalysis \
  --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
  python benchmarks/profile_linear_recurrent.py > "$OUT/pallas_kernels.txt" 2> "$OUT/pallas_kernels.err"
