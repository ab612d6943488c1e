#!/usr/bin/env bash
# The final GPU verification, kernel half (the engine half is run_model.sh in
# the next call): runs on the GPU machine from the repository root with the
# kernel bundle carried, and stashes the SmolLM2 pack folders carried beside
# it (.bundle-smollm2-*) in .bundle-store/ for the next call (as
# `SPEAR_MODEL_STASH=1 run_model.sh` does). In one command:
#   every kernel GPU test binary of the bundle (whole suites), then
#   spear_w4_cuda_test's DecodeMatchesReference 20 more times (--gtest_repeat),
#   compute-sanitizer memcheck of spear_decode_cuda_test (the fused ops, the
#   PDL chain; the 270K-token case left out: slow under the tool),
#   spear_bench_decode_cuda (flags passed through).
# Logs under $OUT (at most 8 files come back): device.txt, kernels.log,
# w4_repeat.log, memcheck.log, bench_decode.md; a summary is printed last.
# Bundle (SPEAR_BUNDLE_DIR, default .bundle-final-k), made here by
#   SPEAR_GPU_BUILD_DIR=build-gpu3 SPEAR_BUNDLE_DIR=.bundle-final-k scripts/gpu/bundle.sh \
#     spear_decode_cuda_test spear_kernels_cuda_test spear_w4_cuda_test spear_bench_decode_cuda
# usage: scripts/gpu/run_final.sh [bench flags: --batches=1,8 --variants=0,1,3,4,5,7]
set -uo pipefail
OUT=${OUT:-gpu-out}
BUNDLE=${SPEAR_BUNDLE_DIR:-.bundle-final-k}
STORE=.bundle-store
mkdir -p "$OUT" "$STORE"
for d in .bundle-smollm2-*; do
  [[ -d "$d" ]] && cp -r "$d" "$STORE/"
done
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
  du -sh "$STORE"/.bundle* "$STORE"/* 2>/dev/null; } | tee "$OUT/device.txt"
rc=0
# Per-suite limit: 420 s. spear_w4_cuda_test runs 274 s on the H200 and 298 s on an H100
# (docs/results/gpu.md, v52 call 2 and "`run_final.sh` in one call with a 420 s per-suite limit"):
# the former 240 s cut it off on both cards. The device tool's own limit is 600 s per command.
for t in spear_decode_cuda_test spear_kernels_cuda_test spear_w4_cuda_test; do
  echo "### $t (date $(date -u +%H:%M:%S))"
  timeout "${SPEAR_TEST_TIMEOUT:-420}" "$BUNDLE/bin/$t" 2>&1
  r=$?
  echo "### $t rc=$r"
  ((r == 0)) || rc=1
done >"$OUT/kernels.log"
echo "### spear_w4_cuda_test --gtest_filter=*DecodeMatchesReference --gtest_repeat=20" \
  >"$OUT/w4_repeat.log"
timeout 300 "$BUNDLE/bin/spear_w4_cuda_test" --gtest_filter='*DecodeMatchesReference' \
  --gtest_repeat=20 >>"$OUT/w4_repeat.log" 2>&1 || rc=1
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
if [[ -n "$CS" ]]; then
  timeout 240 "$CS" --tool memcheck "$BUNDLE/bin/spear_decode_cuda_test" \
    --gtest_filter='-*LongContext*' >"$OUT/memcheck.log" 2>&1 || rc=1
else
  echo "no compute-sanitizer here" >"$OUT/memcheck.log"
fi
timeout "${SPEAR_BENCH_TIMEOUT:-300}" "$BUNDLE/bin/spear_bench_decode_cuda" "$@" \
  >"$OUT/bench_decode.md" 2>&1 || rc=1
echo "===== summary (rc so far $rc)"
grep -hE '^### |^\[  (PASSED|FAILED) |^\[  SKIPPED|^seed ' "$OUT/kernels.log" | grep -v '^seed' 
echo "w4 repeat: $(grep -c '^\[  PASSED  \] 1 test' "$OUT/w4_repeat.log") of 20 passed;" \
  "$(grep -c '^\[  FAILED  \]' "$OUT/w4_repeat.log") FAILED lines"
grep -E 'FAILED|Failure' "$OUT/w4_repeat.log" | head -5
grep -E 'ERROR SUMMARY|PASSED|FAILED' "$OUT/memcheck.log" | tail -4
cat "$OUT/bench_decode.md"
exit $rc
