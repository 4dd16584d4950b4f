#!/usr/bin/env bash
# Chaos smoke set: runs `meridian-chaos run` for primary-kill, switchover and
# region-partition with fixed seeds on the default topology (real agents, real Postgres,
# every link through the proxy mesh) and writes one scorecard JSON per scenario.
# Exit 0 only if every scenario converged and broke no invariant.
# Not wired into .ci/run yet. Usage: scripts/chaos-smoke.sh [OUT_DIR] (default: target/chaos-smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${CARGO_TARGET_DIR:-target}/chaos-smoke}"
mkdir -p "$out"
cargo build --workspace --bins
bin="${CARGO_TARGET_DIR:-target}/debug"
status=0
for run in primary-kill:1 switchover:2 region-partition:3; do
  scenario="${run%%:*}"
  seed="${run##*:}"
  echo "=== chaos smoke: $scenario (seed $seed)"
  # Bounded: one scenario takes well under this (start, ~15-25 s of schedule, convergence).
  if ! timeout 600 "$bin/meridian-chaos" run --scenario "$scenario" --seed "$seed" \
      --json "$out/$scenario.json"; then
    echo "=== chaos smoke: $scenario FAILED (scorecard: $out/$scenario.json)"
    status=1
  fi
done
exit "$status"
