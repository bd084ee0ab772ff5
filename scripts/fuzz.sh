#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/: scenario, safetensors, capture) with clang, ASan and UBSan in
# their own build directory, and runs them (docs/hardening.md).
#
#   scripts/fuzz.sh [SECONDS]   fuzz each target for SECONDS (default 60), starting from the committed
#                               corpus fuzz/corpus/TARGET; new inputs go to BUILD_DIR/corpus/TARGET,
#                               crashes to BUILD_DIR/artifacts/TARGET/; prints executions, cov and ft
#   scripts/fuzz.sh --ci        replay every committed corpus file, then a fixed fuzz per target
#                               (-seed=1 -runs=FUZZ_CI_RUNS): the same inputs on every run, so that
#                               landing never depends on luck
#   scripts/fuzz.sh --seeds     rewrite the generated seeds in fuzz/corpus (fuzz/make_seeds.cpp) and
#                               copy the repository's scenario files into fuzz/corpus/scenario
#   scripts/fuzz.sh --merge     add to fuzz/corpus/TARGET the inputs of BUILD_DIR/corpus/TARGET (what
#                               timed runs found) that reach coverage the committed corpus does not
#                               (libFuzzer -merge=1), so that the committed corpus stays small
#
# Any crash, leak, sanitizer report or broken outcome contract fails the script (exit 1).
# Environment: BUILD_DIR (default build-fuzz), FUZZ_JOBS (targets fuzzed at once, default 1),
# FUZZ_CI_RUNS (default 20000), FUZZ_TARGETS (default "scenario safetensors capture"),
# BUILD_JOBS (default nproc). Installs clang and libclang-rt-14-dev when missing (apt-get, with sudo
# when not root); the normal build never needs them.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="time"
SECONDS_PER_TARGET=60
case "${1:-}" in
  --ci) MODE="ci" ;;
  --seeds) MODE="seeds" ;;
  --merge) MODE="merge" ;;
  "") ;;
  *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS] | --ci | --seeds | --merge" >&2; exit 2 ;;
  *) SECONDS_PER_TARGET="$1" ;;
esac
BUILD_DIR="${BUILD_DIR:-build-fuzz}"
FUZZ_JOBS="${FUZZ_JOBS:-1}"
FUZZ_CI_RUNS="${FUZZ_CI_RUNS:-20000}"
read -r -a TARGETS <<<"${FUZZ_TARGETS:-scenario safetensors capture}"
BUILD_JOBS="${BUILD_JOBS:-$(nproc)}"

# --- what the fuzz build needs beyond the normal one
PACKAGES=(clang libclang-rt-14-dev cmake ninja-build nlohmann-json3-dev libfmt-dev libcli11-dev libblas-dev)
scripts/install_missing_packages.sh fuzz "${PACKAGES[@]}"

if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
        -DMOE_WITH_TORCH=OFF -DMOE_BUILD_TESTS=OFF -DMOE_FUZZ=ON
fi
cmake --build "$BUILD_DIR" -j "$BUILD_JOBS" --target moe-fuzz-make-seeds $(printf 'fuzz_%s ' "${TARGETS[@]}")

# Leaks are reported (detect_leaks), every UBSan finding aborts with a stack.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
DICT="fuzz/moe.dict"

if [ "$MODE" = "seeds" ]; then
  "$BUILD_DIR/fuzz/moe-fuzz-make-seeds" fuzz/corpus
  mkdir -p fuzz/corpus/scenario
  for f in scenarios/*.json tests/base/data/*.json tests/torch/data/*.json; do
    cp "$f" "fuzz/corpus/scenario/seed-$(basename "$(dirname "$f")")-$(basename "$f")"
  done
  echo "fuzz: seeds written to fuzz/corpus"
  exit 0
fi

mkdir -p "$BUILD_DIR/logs"
status=0

if [ "$MODE" = "merge" ]; then
  for t in "${TARGETS[@]}"; do
    before=$(find "fuzz/corpus/$t" -type f | wc -l)
    mkdir -p "$BUILD_DIR/corpus/$t"
    "$BUILD_DIR/fuzz/fuzz_$t" -merge=1 "fuzz/corpus/$t" "$BUILD_DIR/corpus/$t" >"$BUILD_DIR/logs/merge-$t.log" 2>&1 ||
      { echo "fuzz --merge: $t failed (see $BUILD_DIR/logs/merge-$t.log)"; status=1; continue; }
    echo "fuzz --merge: $t: $before -> $(find "fuzz/corpus/$t" -type f | wc -l) inputs"
  done
  exit $status
fi

if [ "$MODE" = "ci" ]; then
  for t in "${TARGETS[@]}"; do
    bin="$BUILD_DIR/fuzz/fuzz_$t"
    log="$BUILD_DIR/logs/ci-$t.log"
    start=$(date +%s)
    # 1. Every committed input once (files given one by one: libFuzzer runs each and stops).
    if ! find "fuzz/corpus/$t" -type f -print0 | xargs -0 -r "$bin" >"$log" 2>&1; then
      echo "fuzz --ci: $t: a committed corpus input fails (see $log)"; tail -40 "$log"; status=1; continue
    fi
    replayed=$(find "fuzz/corpus/$t" -type f | wc -l)
    # 2. A fixed fuzz: seed 1, FUZZ_CI_RUNS inputs mutated from the committed corpus (new inputs kept
    #    in a scratch corpus, never in the repository).
    scratch="$BUILD_DIR/ci-corpus/$t"
    rm -rf "$scratch" && mkdir -p "$scratch" "$BUILD_DIR/artifacts/$t"
    if ! "$bin" -seed=1 -runs="$FUZZ_CI_RUNS" -dict="$DICT" -print_final_stats=1 \
         -artifact_prefix="$BUILD_DIR/artifacts/$t/" "$scratch" "fuzz/corpus/$t" >>"$log" 2>&1; then
      echo "fuzz --ci: $t: the fixed fuzz (-seed=1 -runs=$FUZZ_CI_RUNS) found a failure (see $log)"
      tail -40 "$log"; status=1; continue
    fi
    final=$(grep -E '^#[0-9]+.*(DONE|cov:)' "$log" | tail -1)
    echo "fuzz --ci: $t: $replayed corpus inputs replayed, $FUZZ_CI_RUNS fixed runs ok in $(( $(date +%s) - start )) s: $final"
  done
  exit $status
fi

# --- timed runs, FUZZ_JOBS targets at once
run_target() {
  local t="$1"
  local work="$BUILD_DIR/corpus/$t"
  mkdir -p "$work" "$BUILD_DIR/artifacts/$t"
  "$BUILD_DIR/fuzz/fuzz_$t" -max_total_time="$SECONDS_PER_TARGET" -dict="$DICT" -print_final_stats=1 \
      -artifact_prefix="$BUILD_DIR/artifacts/$t/" "$work" "fuzz/corpus/$t" >"$BUILD_DIR/logs/$t.log" 2>&1
}
pids=()
names=()
for t in "${TARGETS[@]}"; do
  while (( $(jobs -rp | wc -l) >= FUZZ_JOBS )); do sleep 1; done
  echo "fuzz: $t for ${SECONDS_PER_TARGET} s (log $BUILD_DIR/logs/$t.log)"
  run_target "$t" &
  pids+=($!); names+=("$t")
done
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "fuzz: ${names[$i]}: FAILED (crash or contract broken; see $BUILD_DIR/logs/${names[$i]}.log, inputs in $BUILD_DIR/artifacts/${names[$i]}/)"
    status=1
  fi
done
echo "| target | seconds | executions | exec/s | cov | ft | corpus | crashes |"
echo "|--------|--------:|-----------:|-------:|----:|---:|-------:|--------:|"
for t in "${TARGETS[@]}"; do
  log="$BUILD_DIR/logs/$t.log"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  crashes=$(find "$BUILD_DIR/artifacts/$t" -type f | wc -l)
  echo "| $t | $SECONDS_PER_TARGET | ${execs:-?} | ${speed:-?} | ${cov:-?} | ${ft:-?} | ${corp:-?} | $crashes |"
done
exit $status
