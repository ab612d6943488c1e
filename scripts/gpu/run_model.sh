#!/usr/bin/env bash
# Runs on the GPU machine from the repository root: every test binary of
# the bundle (the CUDA model runner's and the CUDA engine's tests against
# the CPU backend: tiny random W4+EC models; SmolLM2 when its .spear is
# here) and spear_bench_model_cuda on SmolLM2 when the bundle has it, logs
# under $OUT. Bundle (SPEAR_BUNDLE_DIR, default .bundle): made by
#   SPEAR_BUNDLE_DIR=.bundle-model scripts/gpu/bundle.sh engine_cuda_runner_test \
#     engine_cuda_engine_test spear_bench_model_cuda
# The model: SPEAR_TEST_SPEAR_MODEL (a .spear directory) if set; else it is
# unpacked from the folders of scripts/gpu/pack_model.sh (SPEAR_MODEL_PACK,
# default .bundle-smollm2) carried in earlier calls and moved into
# .bundle-store/ by SPEAR_MODEL_STASH=1 runs (which do only that, plus the
# tests when SPEAR_MODEL_TESTS=1). Without a model the SmolLM2 test skips
# and the bench is not run.
# usage: scripts/gpu/run_model.sh [bench flags: --batches=1,8,32 --ctx=256 --steps=32 --prefill=512]
set -uo pipefail
OUT=${OUT:-gpu-out}
BUNDLE=${SPEAR_BUNDLE_DIR:-.bundle}
PACK=${SPEAR_MODEL_PACK:-.bundle-smollm2}
STORE=.bundle-store
mkdir -p "$OUT" "$STORE"
# Keep what this call carried (the machine keeps git-ignored files while warm).
for d in "$BUNDLE" "$PACK"-*; do
  [[ -d "$d" ]] && cp -r "$d" "$STORE/"
done
[[ -d "$BUNDLE" ]] || BUNDLE="$STORE/$(basename "$BUNDLE")"
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } \
  | tee "$OUT/device.txt"
ls -la "$STORE" "$STORE"/.bundle* "$STORE"/* > "$OUT/store.txt" 2>&1
run_tests() {
  local rc=0
  for t in "$BUNDLE"/bin/*_test; do
    [[ -x "$t" ]] || continue
    name=$(basename "$t")
    timeout "${SPEAR_TEST_TIMEOUT:-240}" "$t" --gtest_output="xml:$OUT/$name.xml" >"$OUT/$name.log" 2>&1 || rc=1
    grep -E "^\[(  PASSED|  FAILED|  SKIPPED|       OK) |max \|gpu|identical|diverges|perplexity cpu|latency table" \
      "$OUT/$name.log" | tail -60
  done
  return $rc
}
if [[ "${SPEAR_MODEL_STASH:-0}" == 1 ]]; then
  du -sh "$STORE"/.bundle* "$STORE"/* 2>/dev/null
  rc=0
  [[ "${SPEAR_MODEL_TESTS:-0}" == 1 ]] && { run_tests || rc=1; }
  exit $rc
fi
model=${SPEAR_TEST_SPEAR_MODEL:-}
if [[ -z "$model" ]] && compgen -G "$STORE/$(basename "$PACK")-1/model/spear.json" >/dev/null; then
  model="$PWD/.bundle-store/smollm2.spear"
  first="$STORE/$(basename "$PACK")-1"
  mkdir -p "$model"
  cp "$first"/model/* "$model/"
  cat "$STORE/$(basename "$PACK")"-*/model.safetensors.zst.part* \
    | LD_LIBRARY_PATH="$first/lib" "$first/bin/zstd" -d --long=27 -q -o "$model/model.safetensors" -f
  (cd "$model" && sha256sum -c model.safetensors.sha256) | tee "$OUT/model_sha256.txt" || model=""
fi
rc=0
if [[ -n "$model" ]]; then export SPEAR_TEST_SPEAR_MODEL="$model"; fi
run_tests || rc=1
if [[ ! -x "$BUNDLE/bin/spear_bench_model_cuda" ]]; then
  :  # no bench in this bundle
elif [[ -n "$model" ]]; then
  timeout "${SPEAR_BENCH_TIMEOUT:-240}" "$BUNDLE"/bin/spear_bench_model_cuda --model="$model" "$@" 2>&1 \
    | tee "$OUT/bench_model.md" || rc=1
else
  echo "run_model: no model here; bench not run" | tee "$OUT/bench_model.md"
fi
exit $rc
