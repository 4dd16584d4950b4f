#!/usr/bin/env bash
# Long chaos campaign (not part of the default test suite): every scenario x seed x policy
# through `meridian-chaos run`, one scorecard JSON and one log per run, and a summary
# table (summary.tsv) of verdict, RTO, acknowledged losses and split-brain time.
#
# A run passes when the binary exits 0 and its scorecard has no violation, split_brain_ms 0
# and converged true (the same checks as scripts/chaos-smoke.sh). Each run is bounded by
# CHAOS_SCENARIO_TIMEOUT_S (default 300 s).
#
# Usage: scripts/chaos-campaign.sh OUT_DIR
#   CHAOS_SCENARIOS="partial-partition cascade-kill" (default: every scenario but
#   latency-spike, which needs ~35 s of spike and is covered by its own runs)
#   CHAOS_SEEDS="1 2 3 4 5"   CHAOS_POLICIES="default zero-rpo" (also: async)
#   CHAOS_PROFILE=release builds and uses release binaries (default: debug).
#   CHAOS_HOSTS=netns runs every member in its own network namespace (root only).
#   CHAOS_BACKUP_REPO=DIR archives WAL with pgBackRest into DIR/<run> during each run and
#   fills the scorecard's archive_gap (a gap is a violation); DIR must be creatable.
#   CHAOS_BIN_DIR=DIR uses the meridian-chaos and meridian-node binaries in DIR as they
#   are (no build), e.g. a copy, so a rebuild during a long campaign changes nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/chaos-campaign.sh OUT_DIR}"
target="${CARGO_TARGET_DIR:-target}"
profile="${CHAOS_PROFILE:-debug}"
per_run_timeout="${CHAOS_SCENARIO_TIMEOUT_S:-300}"
scenarios="${CHAOS_SCENARIOS:-primary-kill postgres-crash agent-crash primary-partition region-loss region-partition flapping switchover raft-leader-kill partial-partition agent-freeze-partition agent-kill-partition cascade-kill membership-partition graceful-stop host-freeze}"
seeds="${CHAOS_SEEDS:-1 2 3 4 5}"
policies="${CHAOS_POLICIES:-default zero-rpo}"
hosts="${CHAOS_HOSTS:-loopback}"
mkdir -p "$out"
if [ -n "${CHAOS_BIN_DIR:-}" ]; then
  bin="$CHAOS_BIN_DIR"
elif [ "$profile" = release ]; then
  cargo build --release -p meridian-node -p meridian-chaos || exit 1
  bin="$target/release"
else
  cargo build -p meridian-node -p meridian-chaos || exit 1
  bin="$target/debug"
fi
summary="$out/summary.tsv"
[ -s "$summary" ] || printf 'scenario\tseed\tpolicy\tverdict\trto_ms\tacked_lost\tsplit_brain_ms\tfailovers\tarchive_gap\n' >"$summary"
status=0
for scenario in $scenarios; do
  for seed in $seeds; do
    for policy in $policies; do
      base="$out/$scenario-seed$seed-$policy"
      rm -f "$base.json"
      verdict=PASS
      backup_args=()
      if [ -n "${CHAOS_BACKUP_REPO:-}" ]; then
        repo="$CHAOS_BACKUP_REPO/$scenario-seed$seed-$policy"
        rm -rf "$repo" && mkdir -p "$repo"
        # The Postgres OS user writes the repository (root runs Postgres as `postgres`).
        if [ "$(id -u)" -eq 0 ]; then chown postgres "$CHAOS_BACKUP_REPO" "$repo"; fi
        backup_args=(--backup-repo "$repo")
      fi
      if ! timeout -k 30 "$per_run_timeout" "$bin/meridian-chaos" run --scenario "$scenario" \
          --seed "$seed" --policy "$policy" --hosts "$hosts" --bin-dir "$bin" \
          "${backup_args[@]}" --json "$base.json" 2>"$base.log"; then
        verdict=FAIL
      fi
      if [ ! -s "$base.json" ] || ! grep -q '"violations": \[\]' "$base.json" \
          || ! grep -Eq '"split_brain_ms": 0(,|$)' "$base.json" \
          || ! grep -q '"converged": true' "$base.json"; then
        verdict=FAIL
      fi
      field() { sed -n "s/^ *\"$1\": \([^,]*\),\{0,1\}$/\1/p" "$base.json" 2>/dev/null | head -n1; }
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$seed" "$policy" "$verdict" \
        "$(field rto_ms)" "$(field acked_lost)" "$(field split_brain_ms)" "$(field failovers)" \
        "$(field archive_gap)" >>"$summary"
      echo "$scenario seed $seed $policy: $verdict"
      [ "$verdict" = PASS ] || status=1
    done
  done
done
column -t -s $'\t' "$summary" 2>/dev/null || cat "$summary"
exit "$status"
