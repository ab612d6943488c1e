#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) in build-fuzz/, seeds a
# corpus in fuzz-corpus/ (git-ignored) and runs each target for N runs.
#   scripts/fuzz.sh [RUNS]            default RUNS=1000000
#   FUZZ_TARGETS="fuzz_gguf" scripts/fuzz.sh 100000
# Prints executions and crashes per target; exits non-zero if any target
# crashed or failed to run. Crash inputs land in fuzz-corpus/artifacts/.
set -uo pipefail

RUNS=${1:-1000000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${FUZZ_BUILD_DIR:-$ROOT/build-fuzz}
CORPUS=$ROOT/fuzz-corpus
TARGETS=${FUZZ_TARGETS:-fuzz_safetensors fuzz_gguf fuzz_tokenizer fuzz_spear_manifest fuzz_spear_checkpoint}
JOBS=${FUZZ_BUILD_JOBS:-2}

if ! command -v clang++ >/dev/null; then
  echo "fuzz.sh: clang++ not found (scripts/setup.sh installs clang and libclang-rt-14-dev)" >&2
  exit 1
fi

CC=clang CXX=clang++ cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSPEAR_WITH_CUDA=OFF -DSPEAR_BUILD_TESTS=OFF -DSPEAR_BUILD_FUZZERS=ON >"$BUILD.configure.log" 2>&1 \
  || { echo "fuzz.sh: configure failed, see $BUILD.configure.log" >&2; exit 1; }

python3 "$ROOT/tests/fuzz/make_seeds.py" "$CORPUS"
mkdir -p "$CORPUS/artifacts"

# UBSan findings must stop the run so libFuzzer records them as crashes.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}

status=0
summary=()
for t in $TARGETS; do
  if [[ ! -f "$ROOT/tests/fuzz/$t.cc" ]]; then
    summary+=("$t: skipped (source absent)")
    continue
  fi
  if ! cmake --build "$BUILD" -j"$JOBS" --target "$t" >"$BUILD/$t.build.log" 2>&1; then
    summary+=("$t: BUILD FAILED (see $BUILD/$t.build.log)")
    status=1
    continue
  fi
  mkdir -p "$CORPUS/$t"
  log="$BUILD/$t.fuzz.log"
  "$BUILD/tests/fuzz/$t" -runs="$RUNS" -max_len=8192 -rss_limit_mb=2048 -timeout=30 \
    -print_final_stats=1 -artifact_prefix="$CORPUS/artifacts/$t-" "$CORPUS/$t" >"$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(ls "$CORPUS/artifacts/" 2>/dev/null | grep -c "^$t-" || true)
  summary+=("$t: executions=${execs:-?} crashes=$crashes rc=$rc")
  if [[ $rc -ne 0 ]]; then
    status=1
    tail -40 "$log" >&2
  fi
done

echo "---- fuzz summary (runs=$RUNS) ----"
printf '%s\n' "${summary[@]}"
exit $status
