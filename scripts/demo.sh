#!/usr/bin/env bash
# The README's main job: installs what is missing, builds the release binaries and runs
# `meridian-chaos demo` (a local cluster with real PostgreSQL on 127.0.0.1) until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
cargo build --release --workspace
exec target/release/meridian-chaos demo "$@"
