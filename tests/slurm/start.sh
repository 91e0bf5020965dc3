#!/bin/sh
# A one-host Slurm cluster for tests/test_slurm.py (docs/distributed.md, "Multi-node"): Debian's
# slurm-wlm and munge, this machine as the controller and its only compute node. Run as root:
#     tests/slurm/start.sh            # installs (apt) if needed, writes $SLURM_DIR, starts the daemons
#     SLURM_CONF=$SLURM_DIR/slurm.conf srun -N1 -n2 hostname
# Not part of `make test`; `make slurm-test` runs it and the test. Idempotent: daemons already up are kept.
set -eu
SLURM_DIR=${SLURM_DIR:-/tmp/slurm-test}
HOST=$(hostname -s)
CPUS=$(nproc)

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get install -y --no-install-recommends slurm-wlm munge
fi
mkdir -p "$SLURM_DIR/state" "$SLURM_DIR/spool" "$SLURM_DIR/log" /run/munge
chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; }
pgrep -x munged >/dev/null || runuser -u munge -- munged

cat > "$SLURM_DIR/slurm.conf" <<CONF
ClusterName=onehost
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
PropagatePrioProcess=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

export SLURM_CONF="$SLURM_DIR/slurm.conf"
[ -f "$SLURM_DIR/slurmctld.pid" ] && kill -0 "$(cat "$SLURM_DIR/slurmctld.pid")" 2>/dev/null || slurmctld -f "$SLURM_CONF"
[ -f "$SLURM_DIR/slurmd.pid" ] && kill -0 "$(cat "$SLURM_DIR/slurmd.pid")" 2>/dev/null || slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qx idle && { echo "slurm: one-host cluster up ($HOST, $CPUS CPUs); export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 1
done
echo "slurm: the node did not come up idle within 60 s; see $SLURM_DIR/log/" >&2
sinfo >&2 || true
exit 1
