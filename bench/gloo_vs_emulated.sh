#!/usr/bin/env bash
# What real processes cost against the emulated mesh: `moe-lbcheck run` of quickstart.json on the same
# meshes with --backend emulated (threads of one process) and --backend gloo (one process per rank on
# the local launcher: fork, FileStore rendezvous, Gloo on loopback). Prints the wall time of each,
# the best of REPS runs, and their ratio.
#
#   bench/gloo_vs_emulated.sh [CLI] [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
CLI="${1:-build/moe-lbcheck}"
REPS="${2:-3}"
best() {  # best wall seconds of REPS runs of "$@"
  local best=""
  for _ in $(seq "$REPS"); do
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    best=$(echo "$t0 $t1 ${best:-1e9}" | awk '{d = $2 - $1; print (d < $3 ? d : $3)}')
  done
  echo "$best"
}
echo "load average: $(cut -d' ' -f1 /proc/loadavg); $(nproc) cores; best of $REPS"
printf '%-28s %6s %12s %10s %7s\n' mesh ranks emulated_s gloo_s ratio
for mesh in dp=2,pp=2,cp=2,mb=2 tp=2,dp=2,pp=2,cp=2,mb=2; do
  ranks=$(echo "$mesh" | tr ',' '\n' | awk -F= '$1 != "mb" {n *= $2} BEGIN {n = 1} END {print n}')
  e=$(best "$CLI" run scenarios/quickstart.json --mesh "$mesh" -q)
  g=$(best "$CLI" run scenarios/quickstart.json --mesh "$mesh" --backend gloo -q)
  printf '%-28s %6d %12.3f %10.3f %7.2f\n' "$mesh" "$ranks" "$e" "$g" "$(echo "$g $e" | awk '{print $1 / $2}')"
done
