#!/usr/bin/env bash
# Runs on the GPU machine from the repository root with a bundle carried
#   SPEAR_BUNDLE_DIR=.bundle-wg scripts/gpu/bundle.sh spear_w4_cuda_test \
#     spear_bench_w4_cuda engine_cuda_runner_test engine_cuda_engine_test
# The prefill path's checks in one command, logs under $OUT: the prefill
# tests first (the wgmma kernel against the scalar reference), the prefill
# table (spear_bench_w4_cuda --prefill: cuBLAS FP16, dequantize + cuBLAS,
# the wgmma kernel with one / two tiles per warpgroup, the automatic choice,
# same run), every test binary of the bundle, compute-sanitizer memcheck of
# the prefill test, and the kernel's SASS opcode counts.
# usage: scripts/gpu/run_prefill.sh [bench flags, e.g. --ms=512]
set -uo pipefail
OUT=${OUT:-gpu-out}
B=${SPEAR_BUNDLE_DIR:-.bundle}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$B/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } \
  | tee "$OUT/device.txt"
rc=0
timeout 300 "$B/bin/spear_w4_cuda_test" --gtest_filter='*Prefill*' >"$OUT/prefill_test.log" 2>&1 || rc=1
grep -E "^\[  (PASSED|FAILED) |SKIPPED|Failure|y\[" "$OUT/prefill_test.log" | head -20
timeout 300 "$B/bin/spear_bench_w4_cuda" --prefill --ms=64,128,512,2048 "$@" 2>&1 | tee "$OUT/prefill.md" || rc=1
# (one log for all test binaries: the device tool brings back few files)
for t in "$B"/bin/*_test; do
  name=$(basename "$t")
  echo "### $name" >>"$OUT/tests.log"
  timeout 300 "$t" >>"$OUT/tests.log" 2>&1 || rc=1
  echo "### $name: $(sed -n "/^### $name\$/,\$p" "$OUT/tests.log" | grep -E '^\[  (PASSED|FAILED) ' | tr '\n' ' ')"
done
grep -B25 -E "^\[  FAILED  \] [A-Za-z]+\.[A-Za-z]+ \(" "$OUT/tests.log" | head -60
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
if [[ -n "$SAN" ]]; then
  timeout 300 "$SAN" --tool memcheck "$B/bin/spear_w4_cuda_test" --gtest_filter='*PrefillKernels*' \
    >"$OUT/memcheck.log" 2>&1 || rc=1
  grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck.log" | tail -3
fi
command -v cuobjdump >/dev/null || PATH=$PATH:/usr/local/cuda/bin
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$B/bin/spear_bench_w4_cuda" | awk '/Function :/ { on = index($0, "W4WgmmaKernel") > 0; if (on) print }
    on && /\/\*[0-9a-f]+\*\// { op = $2; if (op ~ /^@/) op = $3; sub(/;$/, "", op); n[op]++ }
    END { for (o in n) if (o ~ /GMMA|WARPGROUP|LDGSTS|LDS|BAR|DEPBAR/) printf "%6d %s\n", n[o], o }' \
    | sort -rn | tee "$OUT/sass.txt" | head -20
fi
exit $rc
