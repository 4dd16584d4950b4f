#!/usr/bin/env bash
# The README's main job: installs what is missing, builds the release binaries, then plays
# a chaos scenario on a local multi-region cluster (real agents and PostgreSQL on
# 127.0.0.1 behind the latency/partition proxy mesh, default topology
# us-east:2,us-west:2,eu-central:w1) under a client workload, and prints its scorecard.
#   bash scripts/demo.sh                      partial-partition, seed 1 (about 1 minute)
#   bash scripts/demo.sh run --scenario NAME [--seed N] [--policy default|zero-rpo|async]
#   bash scripts/demo.sh demo                 the cluster alone, until Ctrl-C, to try meridianctl on
# Any arguments are passed to meridian-chaos as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
cargo build --release --workspace
if [ "$#" -eq 0 ]; then
  set -- run --scenario partial-partition --seed 1
fi
exec target/release/meridian-chaos "$@"
