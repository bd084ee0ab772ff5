#!/usr/bin/env bash
# Installs the Debian packages moe-lbcheck needs (only those missing), then configures and builds.
# Idempotent; safe to run without a terminal (CI). Usage: scripts/setup.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build}"

PACKAGES=(
  g++ cmake ninja-build ccache pkg-config
  libtorch-dev libgloo-dev libcli11-dev nlohmann-json3-dev libfmt-dev libgtest-dev
  libblas-dev libopenblas0-pthread
  # the capture helper, its tests and the real-job examples: Debian's torch, torchrun, venv + pip
  python3-torch python3-venv python3-pip python3-setuptools
)
scripts/install_missing_packages.sh setup "${PACKAGES[@]}"

# Debian's LibTorch uses the system BLAS; make sure it is OpenBLAS, not the reference BLAS.
blas=$(update-alternatives --query libblas.so.3-x86_64-linux-gnu 2>/dev/null | awk '/^Value:/{print $2}')
case "$blas" in
  *openblas*) ;;
  *) echo "setup: warning: libblas.so.3 points to '${blas:-?}', not OpenBLAS: LibTorch will be slow" >&2 ;;
esac

if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
cmake --build "$BUILD_DIR" -j "$(nproc)"
