#!/usr/bin/env bash
# Install what `make test-slurm` needs, when it is missing: Debian's slurm-wlm
# (slurmctld, slurmd, sbatch, srun), munge, and PMIx for `srun --mpi=pmix`.
# Needs root and apt-get; does nothing when everything is already there.
set -euo pipefail
need=()
for tool in munged mungekey slurmctld slurmd sbatch srun; do
  command -v "$tool" >/dev/null 2>&1 || need=(slurm-wlm munge)
done
# srun's pmix plugin loads libpmix at run time.
ldconfig -p 2>/dev/null | grep -q 'libpmix\.so' || need+=(libpmix2 libpmix-dev)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: need root and apt-get to install ${need[*]}; install them yourself" >&2
  exit 2
fi
echo "install_slurm.sh: installing ${need[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
