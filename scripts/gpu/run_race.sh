#!/usr/bin/env bash
# The fold kernel's race check and the cuBLAS run-time loader's first GPU
# run, in one device call, from the repository root with the bundle carried:
#   ldd of the bundled binaries (no libcublas may appear: cuBLAS is opened
#     with dlopen on first use, kernels/cuda/cublas_loader.h),
#   spear_w4_cuda_test, whole suite (PrefillMatchesReference: M >= 64 goes
#     through cuBLAS), with LD_DEBUG=libs to show libcublas opened at run time,
#   engine_cuda_runner_test + engine_cuda_engine_test (tiny models; the
#     SmolLM2 cases skip without SPEAR_TEST_SPEAR_MODEL),
#   compute-sanitizer racecheck, then memcheck, of
#     FoldPersistentLoopMatchesReference (every configuration it forces),
#   the same test again in fresh processes with different seeds
#     (SPEAR_TEST_SEED; RACE_SEEDS, default 4 runs),
#   racecheck of FoldSplitsAndDepthsMatchReference if time is left.
# Every step gets at most what is left of RACE_BUDGET seconds (default 320)
# so that the call ends inside its limit. Logs under $OUT (7 files).
# Bundle (SPEAR_BUNDLE_DIR, default .bundle-race), made here by
#   SPEAR_GPU_BUILD_DIR=build-gpu3 SPEAR_BUNDLE_DIR=.bundle-race scripts/gpu/bundle.sh \
#     spear_w4_cuda_test engine_cuda_runner_test engine_cuda_engine_test
set -uo pipefail
OUT=${OUT:-gpu-out}
BUNDLE=${SPEAR_BUNDLE_DIR:-.bundle-race}
BUDGET=${RACE_BUDGET:-320}
B="$BUNDLE/bin"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
rc=0
# run <max seconds> <log> <cmd...>: skipped when the budget is spent.
run() {
  local max=$1 log=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  ((left < max)) && max=$left
  if ((max < 5)); then
    echo "### SKIPPED (budget spent): $*" >>"$log"
    return 0
  fi
  echo "### $* (limit ${max}s, t=${SECONDS}s, $(date -u +%H:%M:%S))" >>"$log"
  timeout "$max" "$@" >>"$log" 2>&1
  local r=$?
  echo "### rc=$r" >>"$log"
  ((r == 0)) || rc=1
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$CS" --version | tail -1; } >"$OUT/device.txt" 2>&1
for t in "$B"/*; do
  echo "== ldd $t"
  ldd "$t" | grep -iE 'cublas|cudart|not found' || true
  echo "   libcublas lines: $(ldd "$t" | grep -ci cublas)"
done >"$OUT/ldd.txt" 2>&1
# LD_DEBUG output goes to stderr with the test's; only the cublas lines are kept.
run 90 "$OUT/w4.log" env LD_DEBUG=libs "$B/spear_w4_cuda_test"
grep -E 'calling init: .*cublas' "$OUT/w4.log" | sed 's/^ *[0-9]*://' | sort -u >"$OUT/w4_cublas.txt"
sed -i '/^ *[0-9]*:\t/d; /^ *[0-9]*: /d' "$OUT/w4.log"
run 60 "$OUT/engine.log" "$B/engine_cuda_runner_test"
run 60 "$OUT/engine.log" "$B/engine_cuda_engine_test"
if [[ -n "$CS" ]]; then
  run 110 "$OUT/racecheck.log" "$CS" --tool racecheck --racecheck-report all \
    "$B/spear_w4_cuda_test" --gtest_filter='*FoldPersistentLoop*'
  run 80 "$OUT/memcheck.log" "$CS" --tool memcheck \
    "$B/spear_w4_cuda_test" --gtest_filter='*FoldPersistentLoop*'
else
  echo "no compute-sanitizer" | tee "$OUT/racecheck.log" >"$OUT/memcheck.log"
  rc=1
fi
for i in $(seq 1 "${RACE_SEEDS:-4}"); do
  run 30 "$OUT/seeds.log" env SPEAR_TEST_SEED=$((RANDOM * 32768 + RANDOM)) \
    "$B/spear_w4_cuda_test" --gtest_filter='*FoldPersistentLoop*'
done
[[ -n "$CS" ]] && run 100 "$OUT/racecheck.log" "$CS" --tool racecheck --racecheck-report all \
  "$B/spear_w4_cuda_test" --gtest_filter='*FoldSplitsAndDepths*'
echo "===== summary (rc $rc, ${SECONDS}s)"
cat "$OUT/device.txt" "$OUT/ldd.txt" "$OUT/w4_cublas.txt"
for f in w4 engine racecheck memcheck seeds; do
  echo "--- $f"
  grep -hE '^### |^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED|OK \]|seed |SUMMARY|hazard|Failure|want' \
    "$OUT/$f.log" | grep -v '^### rc=0' | head -60
done
exit $rc
