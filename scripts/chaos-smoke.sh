#!/usr/bin/env bash
# Chaos smoke set: runs `meridian-chaos run` for primary-kill, switchover and
# region-partition with fixed seeds on the default topology (real agents, real Postgres,
# every link through the proxy mesh) and writes one scorecard JSON (and the run's stderr)
# per scenario.
#
# Exit 0 only if every scenario converged and broke no invariant: the binary's exit code,
# the scorecard's `violations` (must be empty) and `split_brain_ms` (must be 0) are each
# checked, and so is cleanup (no run dir and no process of it left behind).
#
# Bounded: each scenario is killed after CHAOS_SCENARIO_TIMEOUT_S (default 300 s; one
# takes ~30-60 s when it passes, ~2 min when it cannot converge). `scripts/test.sh` (the
# README's test command, and .ci/run) runs it after the tests.
#
# Usage: scripts/chaos-smoke.sh [OUT_DIR]   (default: $CARGO_TARGET_DIR/chaos-smoke)
# CHAOS_PROFILE=release builds and uses release binaries (default: debug, which CI has).
# CHAOS_SMOKE_SET="primary-kill:1 switchover:2" overrides the scenario:seed list.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
out="${1:-$target/chaos-smoke}"
profile="${CHAOS_PROFILE:-debug}"
per_run_timeout="${CHAOS_SCENARIO_TIMEOUT_S:-300}"
set_list="${CHAOS_SMOKE_SET:-primary-kill:1 switchover:2 region-partition:3}"
mkdir -p "$out"
if [ "$profile" = release ]; then
  cargo build --release -p meridian-node -p meridian-chaos
else
  cargo build -p meridian-node -p meridian-chaos
fi
bin="$target/$profile"
status=0
started=$SECONDS
summary=()
for run in $set_list; do
  scenario="${run%%:*}"
  seed="${run##*:}"
  json="$out/$scenario-seed$seed.json"
  log="$out/$scenario-seed$seed.log"
  rm -f "$json"
  echo "=== chaos smoke: $scenario (seed $seed)"
  t=$SECONDS
  verdict=PASS
  # SIGTERM first (the harness then kills its agents and postmasters and removes its run
  # dir), SIGKILL 30 s later if it did not stop.
  if ! timeout -k 30 "$per_run_timeout" "$bin/meridian-chaos" run --scenario "$scenario" \
      --seed "$seed" --json "$json" 2>"$log"; then
    verdict="FAIL (exit code)"
  fi
  cat "$log" >&2
  if [ ! -s "$json" ]; then
    verdict="FAIL (no scorecard)"
  elif ! grep -q '"violations": \[\]' "$json" \
      || ! grep -Eq '"split_brain_ms": 0(,|$)' "$json" \
      || ! grep -q '"converged": true' "$json"; then
    grep -E '"(violations|split_brain_ms|converged)"' "$json" | sed 's/^/    /'
    verdict="FAIL (violations)"
  fi
  # Cleanup: the run dir the harness announced must be gone, and nothing may run from it.
  run_dir="$(sed -n 's/^\[[a-z-]*\] run dir //p' "$log" | head -n1)"
  if [ -n "$run_dir" ]; then
    sleep 1
    if [ -e "$run_dir" ]; then
      echo "    cleanup: run dir $run_dir was left behind"
      verdict="FAIL (cleanup)"
    fi
    if command -v pgrep >/dev/null && pgrep -f -- "$run_dir" >/dev/null; then
      echo "    cleanup: processes of $run_dir still run:"
      pgrep -a -f -- "$run_dir" || true
      verdict="FAIL (cleanup)"
    fi
  fi
  took=$((SECONDS - t))
  echo "=== chaos smoke: $scenario (seed $seed): $verdict in ${took} s (scorecard: $json)"
  summary+=("$scenario:$seed $verdict ${took}s")
  [ "$verdict" = PASS ] || status=1
done
echo "=== chaos smoke summary ($((SECONDS - started)) s):"
printf '    %s\n' "${summary[@]}"
exit "$status"
