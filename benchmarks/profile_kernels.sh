#!/usr/bin/env bash
# Nsight Compute on the kernels the H200 run left short of their targets — where each one stalls.
#
#   benchmarks/profile_kernels.sh OUTDIR [CASE ...]    (default: every case of benchmarks/profile_driver.py)
#
# Run it on the GPU machine after benchmarks/gpu_check.sh, on the same (warm) machine: it uses the venv
# that script built (DK_VENV, default /tmp/dkvenv). For each case, ncu profiles one launch of the case's
# kernel (the second: the first is a warm-up) with the clocks left alone (--clock-control none) and writes
# its report as text to OUTDIR/ncu-CASE.txt: launch statistics, occupancy, compute and memory throughput,
# warp states (the stall reasons) and the scheduler's issue rate. Each case has DK_NCU_TIMEOUT seconds (90).
# A missing prerequisite (the venv, ncu) stops the script at once with exit code 1.
set -uo pipefail

OUTDIR=${1:?usage: benchmarks/profile_kernels.sh OUTDIR [CASE ...]}
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV=${DK_VENV:-/tmp/dkvenv}
PY=$VENV/bin/python
T=${DK_NCU_TIMEOUT:-90}
mkdir -p "$OUTDIR"

[ -x "$PY" ] || { echo "profile_kernels: no venv at $VENV (run benchmarks/gpu_check.sh first, or set DK_VENV)" >&2; exit 1; }
NCU=$(command -v ncu 2>/dev/null || true)
if [ -z "$NCU" ]; then
    for c in /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do
        if [ -x "$c" ]; then NCU=$c; break; fi
    done
fi
[ -n "$NCU" ] || { echo "profile_kernels: ncu (Nsight Compute) not found on PATH, in /usr/local/cuda/bin or /opt/nvidia" >&2; exit 1; }

# case -> the kernel-name regex ncu filters on
declare -A KERNEL=(
    [maha_fma]='tile_gemm_rows_kernel'
    [maha_tf32]='tile_gemm_rows_tc_kernel'
    [step]='step_(plain|forward)_kernel'  # the bench's deterministic step runs the plain one
    [anomaly_map]='anomaly_map_kernel'
    [kernel_matmul]='tile_gemm_rows_kernel'
)
CASES=("$@")
[ "${#CASES[@]}" -gt 0 ] || CASES=(maha_fma maha_tf32 step anomaly_map kernel_matmul)
rc=0
for c in "${CASES[@]}"; do
    k=${KERNEL[$c]:-}
    if [ -z "$k" ]; then echo "profile_kernels: unknown case $c (known: ${!KERNEL[*]})" >&2; rc=1; continue; fi
    echo "== $c: ncu on regex:$k" >&2
    (cd "$REPO" && timeout --kill-after=5 "$T" "$NCU" --clock-control none --target-processes all \
        -k "regex:$k" -s 1 -c 1 \
        --section LaunchStats --section Occupancy --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        "$PY" benchmarks/profile_driver.py "$c") >"$OUTDIR/ncu-$c.txt" 2>&1 || { echo "  $c: FAILED (exit $?)" >&2; rc=1; }
done
exit $rc
