#!/usr/bin/env bash
# Builds the CUDA-enabled tree here (no GPU needed) and bundles the GPU test
# and benchmark binaries plus the non-system shared libraries they need into
# .bundle/ (git-ignored; SPEAR_BUNDLE_DIR names another, e.g. .bundle-decode,
# so that two bundles can coexist), ready to be carried to the GPU machine.
# usage: scripts/gpu/bundle.sh [target...]   (default: every gpu-labelled test)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${SPEAR_GPU_BUILD_DIR:-build-gpu}
BUNDLE=${SPEAR_BUNDLE_DIR:-.bundle}
case "$BUNDLE" in
  .bundle*) ;;  # git-ignored (/.bundle*/)
  *) echo "bundle: SPEAR_BUNDLE_DIR must start with .bundle (git-ignored)" >&2; exit 2 ;;
esac
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPEAR_WITH_CUDA=ON \
  -DSPEAR_CUDA_ARCHS=90a >/dev/null
targets=("$@")
if ((${#targets[@]} == 0)); then targets=(spear_kernels_cuda_test); fi
cmake --build "$BUILD" -j"${SPEAR_JOBS:-2}" --target "${targets[@]}"
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/bin" "$BUNDLE/lib"
for t in "${targets[@]}"; do
  f=$(find "$BUILD" -type f -name "$t" -perm -u+x | head -1)
  [[ -n "$f" ]] || { echo "bundle: $t not built" >&2; exit 1; }
  cp "$f" "$BUNDLE/bin/"
  # Libraries the GPU machine provides itself stay behind: the C runtime,
  # the CUDA driver and runtime, cuBLAS, NCCL.
  ldd "$f" | awk '/=> \// {print $3}' | grep -vE \
    '/(libc|libm|libdl|librt|libpthread|ld-linux[^/]*|libcuda|libcudart|libcublas[^/]*|libnccl|libgcc_s)\.so' \
    | xargs -r -I{} cp -Ln {} "$BUNDLE/lib/" || true
done
cp scripts/gpu/run_tests.sh scripts/gpu/run_w4.sh scripts/gpu/run_decode.sh scripts/gpu/run_model.sh scripts/gpu/run_final.sh scripts/gpu/run_ec_launches.sh \
  "$BUNDLE/"
du -sh "$BUNDLE"
