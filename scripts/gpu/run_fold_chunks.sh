#!/usr/bin/env bash
# Runs on the GPU machine from the repository root with the bundle carried
# (SPEAR_BUNDLE_DIR=.bundle-ch scripts/gpu/bundle.sh spear_w4_cuda_test
# spear_bench_w4_cuda spear_bench_decode_cuda): the W4 tests, memcheck of
# the short-chunk test, the fold sweep (incl. the v22 ring chunks of half /
# a quarter of the fold width), the decode table + 8B layer graph, the decode
# step with and without half chunks, and ncu (DRAM throughput, SM activity)
# of the four 8B GEMMs at M = 1; logs under $OUT (docs/results/gpu.md, "v22").
# usage: scripts/gpu/run_fold_chunks.sh [sweep Ms, default 1,8]
set -uo pipefail
OUT=${OUT:-gpu-out}
BUNDLE=${SPEAR_BUNDLE_DIR:-.bundle-ch}
B=$BUNDLE/bin
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } \
  | tee "$OUT/device.txt"
rc=0
timeout 300 "$B/spear_w4_cuda_test" >"$OUT/w4_test.log" 2>&1 || rc=1
grep -E "^\[ +(OK|FAILED|PASSED|SKIPPED) +\]|seed" "$OUT/w4_test.log" | tail -20
timeout 200 compute-sanitizer --tool memcheck "$B/spear_w4_cuda_test" \
  --gtest_filter='*FoldShortChunks*' >"$OUT/memcheck.log" 2>&1 || rc=1
tail -2 "$OUT/memcheck.log"
timeout 240 "$B/spear_bench_w4_cuda" --sweep --ms="${1:-1,8}" 2>&1 | tee "$OUT/sweep.md" || rc=1
timeout 200 "$B/spear_bench_w4_cuda" --decode 2>&1 | tee "$OUT/table.md" || rc=1
timeout 150 "$B/spear_bench_decode_cuda" --models=8B,1B --batches=1,8 --variants=0,16,3 2>&1 \
  | tee "$OUT/step.md" || rc=1
timeout 120 /usr/local/cuda/bin/ncu --clock-control none --kernel-name-base demangled \
  -k 'regex:W4FoldKernel' --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,sm__cycles_active.avg,sm__cycles_elapsed.avg \
  "$B/spear_bench_w4_cuda" --profile >"$OUT/ncu.log" 2>&1 || rc=1
grep -E "W4FoldKernel|gpu__time|dram__|sm__cycles" "$OUT/ncu.log" | head -80
exit $rc
