#!/bin/sh
# Stops the one-host Slurm cluster of tests/slurm/start.sh (its slurmd and slurmctld; munged is left running).
SLURM_DIR=${SLURM_DIR:-/tmp/slurm-test}
for daemon in slurmd slurmctld; do
  [ -f "$SLURM_DIR/$daemon.pid" ] && kill "$(cat "$SLURM_DIR/$daemon.pid")" 2>/dev/null
done
exit 0
