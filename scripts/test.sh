#!/usr/bin/env bash
# The test command of the README and of CI: installs what is missing, then builds and runs
# every test (real PostgreSQL servers on 127.0.0.1), the chaos smoke set, clippy and
# rustfmt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
# A build from a clean clone gains nothing from incremental state, which would double the
# target directory (about 5 GB without it). Say plainly when the disk cannot hold a build.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
build_dir="${CARGO_TARGET_DIR:-.}"
[ -d "$build_dir" ] || build_dir=.
free_kb=$(df -Pk "$build_dir" 2>/dev/null | awk 'NR==2 {print $4}' || true)
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((4 * 1024 * 1024)) ]; then
  echo "scripts/test.sh: only $((free_kb / 1024)) MB free where the build goes; a build and the tests need about 4 GB" >&2
  exit 1
fi
# The pure cores stay pure: no async runtime, RPC, Postgres client or config parser.
if cargo tree -p meridian-core -e normal --prefix none | grep -E '^(tokio|tonic|prost|tokio-postgres|postgres|toml|meridian-proto) '; then
  echo "meridian-core must not depend on the crates listed above" >&2
  exit 1
fi
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads="${MERIDIAN_TEST_THREADS:-2}"
# Chaos smoke set: primary-kill, switchover, region-partition with fixed seeds on the
# default topology (real agents and Postgres behind the proxy mesh). Set
# MERIDIAN_SKIP_CHAOS_SMOKE=1 to leave it out of a quick local run.
if [ "${MERIDIAN_SKIP_CHAOS_SMOKE:-0}" != 1 ]; then
  bash scripts/chaos-smoke.sh "${CARGO_TARGET_DIR:-target}/chaos-smoke"
fi
cargo clippy --workspace --all-targets -- -D warnings
cargo fmt --all --check
