#!/usr/bin/env bash
# Stop the cluster that start_cluster.sh DIR started: its jobs, then
# slurmd, slurmctld and munged, each by the pid in its pid file.
set -uo pipefail
DIR=${1:?usage: stop_cluster.sh DIR}
export SLURM_CONF="$DIR/slurm.conf"
if [ -f "$SLURM_CONF" ]; then
  timeout 10 scancel --user="$(id -un)" >/dev/null 2>&1 || true
fi
stop() {  # pid file, name
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  echo "stop_cluster.sh: $2 (pid $pid) did not stop on SIGTERM; killing it" >&2
  kill -9 "$pid" 2>/dev/null || true
}
stop "$DIR/slurmd.pid" slurmd
stop "$DIR/slurmctld.pid" slurmctld
stop "$DIR/munge/munged.pid" munged
exit 0
