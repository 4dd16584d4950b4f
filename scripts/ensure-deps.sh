#!/usr/bin/env bash
# Installs what building and testing Meridian needs on a fresh Debian machine:
# PostgreSQL server binaries (>= 13), pgBackRest (backups and WAL archiving), iproute2 and iptables (as root, for the separate-host
# tests) and the rustfmt/clippy components. Idempotent.
set -euo pipefail

have_pg() {
  command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ] && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

if ! have_pg; then
  echo "ensure-deps: installing PostgreSQL server binaries (Debian package postgresql)"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq postgresql >/dev/null
  # The Debian package starts a default cluster on 5432; Meridian needs none of it.
  $SUDO systemctl stop postgresql >/dev/null 2>&1 || $SUDO service postgresql stop >/dev/null 2>&1 || true
fi

# Backups, WAL archiving and point-in-time recovery ([backup], tests/tests/backup.rs).
if ! command -v pgbackrest >/dev/null 2>&1; then
  echo "ensure-deps: installing pgBackRest (Debian package pgbackrest)"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq pgbackrest >/dev/null
fi

# Separate-host tests (tests/tests/hosts.rs, meridian-chaos --hosts netns) build network
# namespaces and partition them with iptables; as root, install what they need.
if [ "$(id -u)" -eq 0 ] && { ! command -v ip >/dev/null 2>&1 || ! command -v iptables >/dev/null 2>&1; }; then
  echo "ensure-deps: installing iproute2 and iptables (separate-host tests)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq iproute2 iptables >/dev/null
fi

if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  # Postgres refuses to run as root: the agents run it as this unprivileged user.
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
fi
