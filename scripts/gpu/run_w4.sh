#!/usr/bin/env bash
# Runs on the GPU machine from the repository root with .bundle carried
# (scripts/gpu/bundle.sh spear_w4_cuda_test spear_kernels_cuda_test
# spear_bench_w4_cuda): the GPU tests, the torch int4 peer and the W4 GEMM
# table, all in one command; logs under $OUT.
# usage: scripts/gpu/run_w4.sh [--quick | --decode]   (--decode: M <= 16 only)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } \
  | tee "$OUT/device.txt"
rc=0
for t in .bundle/bin/*_test; do
  name=$(basename "$t")
  timeout "${SPEAR_TEST_TIMEOUT:-600}" "$t" --gtest_output="xml:$OUT/$name.xml" >"$OUT/$name.log" 2>&1 || rc=1
  tail -3 "$OUT/$name.log"
done
PYTHONUNBUFFERED=1 timeout "${SPEAR_TORCH_TIMEOUT:-1200}" python3 scripts/gpu/torch_int4_bench.py "$OUT/torch_int4.csv" "$@" \
  >"$OUT/torch_int4.log" 2>&1 || { rc=1; tail -5 "$OUT/torch_int4.log"; }
.bundle/bin/spear_bench_w4_cuda --torch="$OUT/torch_int4.csv" "$@" 2>&1 | tee "$OUT/bench_w4.md" || rc=1
exit $rc
