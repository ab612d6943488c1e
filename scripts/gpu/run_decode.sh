#!/usr/bin/env bash
# Runs on the GPU machine from the repository root with the bundle carried
# (SPEAR_BUNDLE_DIR, default .bundle; made by
# `scripts/gpu/bundle.sh spear_decode_cuda_test spear_kernels_cuda_test
# spear_bench_decode_cuda`): the bundled GPU tests, then the end-to-end
# decode-step table (spear_bench_decode_cuda, flags passed through), all in
# one command; logs under $OUT.
# usage: scripts/gpu/run_decode.sh [bench flags: --models=8B,1B --ctx=512 --batches=1,8,32]
set -uo pipefail
OUT=${OUT:-gpu-out}
BUNDLE=${SPEAR_BUNDLE_DIR:-.bundle}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } \
  | tee "$OUT/device.txt"
rc=0
for t in "$BUNDLE"/bin/*_test; do
  [[ -x "$t" ]] || continue
  name=$(basename "$t")
  timeout "${SPEAR_TEST_TIMEOUT:-300}" "$t" --gtest_output="xml:$OUT/$name.xml" >"$OUT/$name.log" 2>&1 || rc=1
  tail -3 "$OUT/$name.log"
done
timeout "${SPEAR_BENCH_TIMEOUT:-600}" "$BUNDLE"/bin/spear_bench_decode_cuda "$@" 2>&1 \
  | tee "$OUT/bench_decode.md" || rc=1
exit $rc
