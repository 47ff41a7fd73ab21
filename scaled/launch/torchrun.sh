#!/usr/bin/env bash
# Launch a run config with torchrun (DDP; expert parallelism for M6-100B). One node:
#   bash scaled/launch/torchrun.sh scaled/configs/runs/m6_base_pretrain.yaml [key=value ...]
# Several nodes: run it on every node with the same HEAD (the first node's address) and NNODES:
#   NNODES=4 HEAD=node001 bash scaled/launch/torchrun.sh RUN.yaml
# Environment: NPROC (processes per node, default: the GPUs nvidia-smi lists, else 1), NNODES (default 1), HEAD
# (default 127.0.0.1), PORT (default 29500), DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
RUN=${1:?usage: bash scaled/launch/torchrun.sh RUN.yaml [key=value ...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$NPROC" -ge 1 ] || NPROC=1
fi
NNODES=${NNODES:-1}
HEAD=${HEAD:-127.0.0.1}
PORT=${PORT:-29500}
cmd=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_id "${RDZV_ID:-mmkit}" --rdzv_backend c10d
     --rdzv_endpoint "$HEAD:$PORT" scaled/train.py "$RUN" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
