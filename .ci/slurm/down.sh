#!/usr/bin/env bash
# Tear down the cluster that up.sh started: cancel every job, stop the daemons, drop state.
# Leaves the Debian packages and the MariaDB data directory (system database) in place.
# Set MS_SLURM_KEEP_STATE=1 to keep $MS_SLURM_STATE (logs) for inspection.
set -uo pipefail
export PATH=/usr/sbin:$PATH
STATE=${MS_SLURM_STATE:-/var/lib/mergesweep-slurm}
[ "$(id -u)" = 0 ] || { echo "slurm-down: must run as root" >&2; exit 1; }

if pgrep -x slurmctld >/dev/null; then scancel --full --quiet --user="$(id -un)" 2>/dev/null || true; fi

stop() {  # stop NAME PIDFILE
  local name=$1 pidfile=$2 pids
  pids=$(cat "$pidfile" 2>/dev/null || pgrep -x "$name" || true)
  [ -n "$pids" ] || return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 50); do kill -0 $pids 2>/dev/null || return 0; sleep 0.2; done
  kill -9 $pids 2>/dev/null || true
}
stop slurmd /run/slurm/slurmd.pid
stop slurmctld /run/slurm/slurmctld.pid
stop slurmdbd /run/slurm/slurmdbd.pid
if command -v mariadb >/dev/null; then mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db;" 2>/dev/null || true; fi
stop mariadbd /run/mysqld/mysqld.pid
stop munged /run/munge/munged.pid
rm -f /dev/fakegpu[0-9]*
if [ "${MS_SLURM_KEEP_STATE:-0}" != 1 ]; then rm -rf "$STATE"; fi
rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf /etc/slurm/slurmdbd.conf
echo "slurm-down: stopped"
