#!/usr/bin/env bash
# One node, N processes: any `moslim` stage under torchrun with the same config + parallel.* overrides.
#   launchers/torchrun.sh NPROC <moslim args...>
#   launchers/torchrun.sh 8 rm train --config configs/rm_world.yaml --out runs/rm parallel.tp=2
# gloo on CPU, NCCL on GPUs (chosen by moslim_mega.parallel.dist). Multi-node: see slurm/.
set -euo pipefail
NPROC="${1:?usage: launchers/torchrun.sh NPROC <moslim args...>}"
shift
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # N processes share the cores
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m moslim_mega.cli "$@"
