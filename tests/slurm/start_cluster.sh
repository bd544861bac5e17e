#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine for tests/test_slurm.py:
# munged, slurmctld and slurmd, all as root, with every file (config, state,
# spool, logs, munge key and socket) under DIR.  Nothing in /etc is touched:
# clients find the cluster through SLURM_CONF=DIR/slurm.conf.
#
#   tests/slurm/start_cluster.sh DIR [CPUS]     # then: export SLURM_CONF=DIR/slurm.conf
#   tests/slurm/stop_cluster.sh DIR
#
# Needs Debian's slurm-wlm and munge (and libpmix2 for `srun --mpi=pmix`):
#   apt-get install slurm-wlm munge libpmix2 libpmix-dev
set -euo pipefail
DIR=${1:?usage: start_cluster.sh DIR [CPUS]}
CPUS=${2:-2}
HERE=$(cd "$(dirname "$0")" && pwd)

[ "$(id -u)" = 0 ] || { echo "start_cluster.sh: the Slurm daemons need root" >&2; exit 2; }
for tool in munged mungekey slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null || {
    echo "start_cluster.sh: $tool not found; apt-get install slurm-wlm munge libpmix2 libpmix-dev" >&2; exit 2; }
done

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
chmod 0700 "$DIR"
mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log"
chmod 0700 "$DIR/munge"
NODE=$(hostname -s)
# Ports away from the defaults (6817/6818) so a site's Slurm is not disturbed.
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-16817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-16818}

# munge: a private key and socket.
[ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" --force
chmod 0400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.sock" \
       --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
       --seed-file="$DIR/munge/munge.seed"

sed -e "s|@DIR@|$DIR|g" -e "s|@NODE@|$NODE|g" -e "s|@CPUS@|$CPUS|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    "$HERE/slurm.conf.in" > "$DIR/slurm.conf"
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -i -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$NODE"

# Wait (bounded) for the node to be idle.
for _ in $(seq 1 60); do
  state=$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null || true)
  if [ "$state" = "idle" ]; then
    echo "start_cluster.sh: node $NODE idle; export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "start_cluster.sh: node $NODE not idle after 60 s (state '${state:-none}'); logs in $DIR/log" >&2
tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
exit 1
