#!/usr/bin/env bash
# The test command of the README and of CI: installs what is missing, then builds and runs
# every test (real PostgreSQL servers on 127.0.0.1), clippy and rustfmt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads="${MERIDIAN_TEST_THREADS:-2}"
cargo clippy --workspace --all-targets -- -D warnings
cargo fmt --all --check
