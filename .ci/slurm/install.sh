#!/usr/bin/env bash
# Install the Debian packages of the single-node SLURM test cluster (root only; idempotent).
# Called by `make test` (target slurm-packages) when running as root; the SLURM tests skip
# with a clear reason where these are missing.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm-install: not root, skipping (SLURM tests will skip)"; exit 0; }
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -z "$missing" ]; then echo "slurm-install: packages present"; exit 0; fi
command -v apt-get >/dev/null || { echo "slurm-install: no apt-get; install$missing by hand" >&2; exit 0; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq $PKGS >/dev/null
echo "slurm-install: installed$missing"
