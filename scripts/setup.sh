#!/usr/bin/env bash
# Installs every dependency of SPEAR (Debian packages + PyPI packages).
# Idempotent: when everything is present it only checks and returns quickly.
# `apt-get update` runs at most once, and only when something is missing.
set -euo pipefail

DEBIAN_PKGS=(
  build-essential cmake ninja-build ccache pkg-config git curl ca-certificates
  clang lld libclang-rt-14-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev libucx-dev
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  libsentencepiece-dev libeigen3-dev libopenblas-dev libpcre2-dev
  nlohmann-json3-dev libspdlog-dev
  prometheus shellcheck
  python3 python3-pip
)
PY_PKGS=(numpy gguf grpcio grpcio-tools kubernetes-validate matplotlib helm-python-sdk)

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup.sh: need root or sudo to install Debian packages" >&2; exit 1; fi
fi

missing=()
for p in "${DEBIAN_PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  echo "setup.sh: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
pymissing=()
for p in "${PY_PKGS[@]}"; do
  mod=${p//-/_}
  [[ $p == grpcio ]] && mod=grpc
  [[ $p == grpcio-tools ]] && mod=grpc_tools
  [[ $p == helm-python-sdk ]] && mod=helm_python  # Helm v4 SDK (chart render + lint, tests/deploy)
  if ! "$PY" -c "import $mod" >/dev/null 2>&1; then pymissing+=("$p"); fi
done
if ((${#pymissing[@]})); then
  echo "setup.sh: installing PyPI packages: ${pymissing[*]}"
  "$PY" -m pip install -q --disable-pip-version-check "${pymissing[@]}" \
    || "$PY" -m pip install -q --disable-pip-version-check --break-system-packages "${pymissing[@]}"
fi
echo "setup.sh: dependencies present"
