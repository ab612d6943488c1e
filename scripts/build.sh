#!/usr/bin/env bash
# Configures and builds SPEAR into ${SPEAR_BUILD_DIR:-build} (Release, Ninja,
# ccache when present). Used by test.sh and demo.sh; assumes setup.sh ran.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${SPEAR_BUILD_DIR:-build}
if [[ ! -f "$BUILD/build.ninja" ]]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release ${SPEAR_CMAKE_ARGS:-}
fi
cmake --build "$BUILD" -j"${SPEAR_JOBS:-2}"
