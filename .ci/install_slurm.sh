#!/usr/bin/env bash
# Installs Slurm (Debian's slurm-wlm 22.05) and munge for tests/test_slurm.py.
# Starts nothing: the test starts its own one-node cluster (tests/slurm_cluster.py).
# Idempotent; needs root (or sudo) and Debian's package archive.
set -euo pipefail
missing=0
for b in munged slurmctld slurmd sbatch srun squeue scontrol scancel sinfo; do
  if ! command -v "$b" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$b" ]; then missing=1; fi
done
if [ "$missing" -eq 0 ]; then
  echo "install_slurm: slurm-wlm and munge already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq slurm-wlm munge >/dev/null
echo "install_slurm: installed $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || echo slurm-wlm)"
