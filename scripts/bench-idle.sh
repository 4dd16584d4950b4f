#!/usr/bin/env bash
# The idle-cost benchmark of issue 14: builds the release binaries, then runs
# `meridian-chaos idle-bench` — a plain Postgres primary with two standbys as the baseline,
# then a healthy idle 3-member Meridian cluster (real agents, real Postgres on 127.0.0.1),
# each measured for --seconds (default 60): agent + watchdog CPU per member, the probes'
# CPU on Postgres (above the plain baseline), new sessions per second, agent RSS; then
# --churn (default 10000) gRPC and HTTP connections opened and closed against one agent and
# its RSS after. Prints a table; exits 1 when a target is missed.
#   scripts/bench-idle.sh [--seconds N] [--churn N] [--topology us-east:2,us-west:1]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
cargo build --release -p meridian-node -p meridian-chaos
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/meridian-chaos" idle-bench --bin-dir "$target/release" "$@"
