#!/usr/bin/env bash
# The test command of the README and of CI: installs what is missing, then builds and runs
# every test (real PostgreSQL servers on 127.0.0.1), the chaos smoke set, clippy and
# rustfmt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads="${MERIDIAN_TEST_THREADS:-2}"
# Chaos smoke set: primary-kill, switchover, region-partition with fixed seeds on the
# default topology (real agents and Postgres behind the proxy mesh). Set
# MERIDIAN_SKIP_CHAOS_SMOKE=1 to leave it out of a quick local run.
if [ "${MERIDIAN_SKIP_CHAOS_SMOKE:-0}" != 1 ]; then
  bash scripts/chaos-smoke.sh "${CARGO_TARGET_DIR:-target}/chaos-smoke"
fi
cargo clippy --workspace --all-targets -- -D warnings
cargo fmt --all --check
