#!/usr/bin/env bash
# The README's test command: install dependencies, build, fetch the real
# model into the cache, run every CPU test (GPU tests skip with a message
# when no GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
BUILD=${SPEAR_BUILD_DIR:-build}
"$BUILD/cli/spear" pull smollm2-135m
ctest --test-dir "$BUILD" --output-on-failure -j"${SPEAR_JOBS:-2}" --timeout 900
