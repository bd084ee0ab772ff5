#!/usr/bin/env bash
# The sanitizer job (docs/hardening.md): a second build directory without LibTorch (an uninstrumented
# LibTorch would bring false reports), built with AddressSanitizer + UndefinedBehaviorSanitizer, any
# finding fatal; then the torch-free tests (moe_base_tests, which include the bad-input end-to-end
# tables run through the torch-free driver moe-lbcheck-inputs) under CTest.
#
#   scripts/sanitize.sh [BUILD_DIR]   default build-sanitize; CXX picks the compiler (default g++)
#
# Exit 0 when every test passes with no sanitizer report; a report aborts its test, which fails.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build-sanitize}"
CXX_COMPILER="${CXX:-g++}"
SANITIZE_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"

if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX_COMPILER" \
        -DMOE_WITH_TORCH=OFF -DCMAKE_CXX_FLAGS="$SANITIZE_FLAGS" \
        -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined"
fi
cmake --build "$BUILD_DIR" -j "${BUILD_JOBS:-$(nproc)}"

# Leaks count as failures; UBSan prints the stack of what it found.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 600
