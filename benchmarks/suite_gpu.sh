#!/usr/bin/env bash
# The suite on one GPU, in parts that each fit a device call of 10 minutes; `--merge` then combines them.
# Usage (device machine, repo root): bash benchmarks/suite_gpu.sh PART OUT_DIR [more suite arguments]
#   PART: attention (dense, sliding window, block sparse at S2048 and S16384, causal, D128),
#         linear (delta rule, simple GLA, GLA at B4 S8192: 1-3 minutes a case), scan (the complexity scan);
#   arguments after OUT_DIR go to the suite last, so they override the part's (e.g. --seqs 2048).
# Peers that are not on the machine travel as wheels: tokamax and its needs in .whl_tk/ (with .whl_tk/shim, a
# stand-in for xprof, which tokamax imports only for its own profiler), fla-core in .whl_fla/.
set -uo pipefail
part=${1:?usage: suite_gpu.sh PART OUT_DIR}
out=${2:?usage: suite_gpu.sh PART OUT_DIR}
wheels=$(ls .whl_tk/*.whl .whl_fla/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
  export PYTHONPATH=/tmp/site:$PWD/.whl_tk/shim
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
budget=${SUITE_BUDGET:-430}
common=(--out "$out" --budget "$budget" --min-time 0.25 --head-dims 128 --seqs 2048 16384)
case $part in
  attention) args=(--families dense sliding_window block_sparse --causal causal --windows 512 --densities 0.25 --no-scan) ;;
  # Our quadratic "xla" and step-by-step "recurrent" forms are references: timing them at 16k costs minutes.
  # Only the kernels are timed; the float32 "xla" reference still compiles for the check, and with XLA's GEMM
  # autotuner on, one such compile took over 2 minutes on the H200 (a case ran past 9 minutes): turned off here.
  linear) args=(--families linear_recurrent --seqs 8192 --mechanisms delta_rule simple_gla gla --forms pallas
                --no-scan)
          export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" ;;
  scan) args=(--families none --scan-seqs 1024 4096 16384) ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
# XLA's out-of-memory reports run to thousands of lines: keep the suite's own log lines and errors.
# Line-buffered, so that a run cut by the caller's time limit still shows how far it got.
python3 -m benchmarks.suite "${common[@]}" "${args[@]}" "${@:3}" 2>&1 | grep --line-buffered -E '^\[|Error' \
  | stdbuf -oL cut -c1-400
