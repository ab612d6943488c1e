#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with .bundle carried:
# every bundled gtest binary, logs and JUnit XML under $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
rc=0
for t in .bundle/bin/*_test; do
  name=$(basename "$t")
  "$t" --gtest_output="xml:$OUT/$name.xml" 2>&1 | tee "$OUT/$name.log" || rc=1
done
exit $rc
