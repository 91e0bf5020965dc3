#!/bin/sh
# One torchrun agent per Slurm task, all of one c10d rendezvous: the per-node half of a multi-node
# --launcher (docs/distributed.md, "Multi-node"). The daemon runs on the allocation's first node and
# starts every file's child through srun, which runs this script once per node:
#
#   python -m daemon --launcher "srun --kill-on-bad-exit=1 --ntasks-per-node 1 examples/slurm/torchrun_node.sh"
#
# srun passes no shell over its command, so the Slurm variables are read here, on each node:
#   --nnodes          $SLURM_NTASKS (one task a node: the number of nodes)
#   --rdzv-endpoint   the step's first node, port $RDZV_PORT (29500); it hosts the rendezvous store
#   --rdzv-id         $SLURM_JOB_ID.$SLURM_STEP_ID: every attempt (srun step) meets only its own agents
# and the arguments after the script (the daemon's "-m daemon train ...") go to torchrun.
# NPROC_PER_NODE ranks an agent (default: gpu, one a GPU); TORCHRUN the command ("torchrun", or
# "python -m torch.distributed.run" of the daemon's environment); RDZV_JOIN_TIMEOUT seconds for every
# agent to join (default 120: a node that never comes fails the attempt, it does not wait for ever);
# SHUTDOWN_TIMEOUT seconds an agent gives its ranks to checkpoint after a SIGTERM before it kills them
# (default 120, the daemon's --stop_grace_seconds; torchrun's own default is 30).
set -eu
: "${SLURM_NTASKS:?run this under srun}"
head=$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n 1)
exec ${TORCHRUN:-torchrun} \
  --nnodes "$SLURM_NTASKS" \
  --nproc_per_node "${NPROC_PER_NODE:-gpu}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$head:${RDZV_PORT:-29500}" \
  --rdzv-id "$SLURM_JOB_ID.${SLURM_STEP_ID:-0}" \
  --rdzv-conf "join_timeout=${RDZV_JOIN_TIMEOUT:-120}" \
  --max-restarts 0 \
  --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}" \
  "$@"
