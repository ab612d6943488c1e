#!/usr/bin/env bash
# Runs on the GPU machine from the repository root with the bundle carried
# (SPEAR_BUNDLE_DIR=.bundle-w4 scripts/gpu/bundle.sh spear_w4_cuda_test
# spear_kernels_cuda_test spear_bench_w4_cuda): the GPU tests, the fold
# kernel's split x depth sweep, the torch int4 peer and the decode table
# (M <= 16, with the 8B layer graph), and an ncu profile of the four 8B
# GEMMs at M = 1 (fold as dispatched, fold one tile per block, v8), then memcheck on the
# fold kernel's forced configurations. With spear_bench_decode_cuda (and
# spear_decode_cuda_test) in the bundle also the end-to-end decode step and
# memcheck of the small kernels' PDL chain. At most 8 files under $OUT (the
# device tool brings back 8): pass --no-ncu or --no-torch when the bundle
# has all five binaries.
# usage: scripts/gpu/run_w4_fold.sh [--no-tests] [--no-sweep] [--no-torch] [--no-ncu]
#                                   [--no-memcheck] [--no-decode-step]
set -uo pipefail
B=${SPEAR_BUNDLE_DIR:-.bundle-w4}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$B/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
args=" $* "
misc="$OUT/misc.log"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } | tee "$misc"
rc=0
if [[ $args != *" --no-tests "* ]]; then
  for t in "$B"/bin/*_test; do
    name=$(basename "$t")
    timeout "${SPEAR_TEST_TIMEOUT:-70}" "$t" >"$OUT/$name.log" 2>&1 || rc=1
    grep -E "^\[  (PASSED|FAILED)|seed|FAILED" "$OUT/$name.log" | head -12
  done
fi
if [[ $args != *" --no-sweep "* ]]; then
  # SPEAR_SWEEP_MS=1 narrows the sweep to M = 1 (default 1, 4, 8)
  timeout 80 "$B/bin/spear_bench_w4_cuda" --sweep ${SPEAR_SWEEP_MS:+--ms=$SPEAR_SWEEP_MS} 2>&1 \
    | tee "$OUT/sweep.md" || rc=1
fi
torch_arg=
if [[ $args != *" --no-torch "* ]]; then
  PYTHONUNBUFFERED=1 timeout 60 python3 scripts/gpu/torch_int4_bench.py "$OUT/torch_int4.csv" --decode \
    >>"$misc" 2>&1 || { rc=1; tail -5 "$misc"; }
  torch_arg=--torch="$OUT/torch_int4.csv"
fi
timeout 100 "$B/bin/spear_bench_w4_cuda" $torch_arg --decode 2>&1 | tee "$OUT/bench_w4.md" || rc=1
if [[ $args != *" --no-ncu "* ]]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  if [[ -n "$NCU" ]]; then
    timeout 60 "$NCU" --clock-control none -k regex:'W4FoldKernel|W4RingKernel' --launch-count 12 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      "$B/bin/spear_bench_w4_cuda" --profile >"$OUT/ncu.txt" 2>&1 || rc=1
    grep -E "W4(Fold|Ring)Kernel|DRAM Throughput|Duration|No Eligible|Achieved Occupancy" "$OUT/ncu.txt" | head -60
  else
    echo "no ncu" | tee -a "$misc"
  fi
fi
if [[ -x "$B/bin/spear_bench_decode_cuda" && $args != *" --no-decode-step "* ]]; then
  # the end-to-end decode step (8B and 1B shapes, batch 1 / 8 / 32, ctx 512),
  # with the A/B rows of the small kernels' PDL and the GEMMs' L2 prefetch
  timeout 240 "$B/bin/spear_bench_decode_cuda" --variants=0,1,2,3,4,5,6 2>&1 \
    | tee "$OUT/bench_decode.md" || rc=1
fi
if [[ $args != *" --no-memcheck "* ]]; then
  # compute-sanitizer memcheck on the fold kernel's forced configurations
  # (4 and 8 warps, the L2 prefetch modes) and on the PDL
  # chain of the small kernels; appended to misc.log
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
  if [[ -n "$CS" ]]; then
    timeout 45 "$CS" --tool memcheck "$B/bin/spear_w4_cuda_test" --gtest_filter='*FoldSplits*' 2>&1 \
      | tail -6 | tee -a "$misc" || rc=1
    if [[ -x "$B/bin/spear_decode_cuda_test" ]]; then
      timeout 30 "$CS" --tool memcheck "$B/bin/spear_decode_cuda_test" \
        --gtest_filter='*ProgrammaticLaunch*' 2>&1 | tail -4 | tee -a "$misc" || rc=1
    fi
  fi
fi
exit $rc
