#!/usr/bin/env bash
# One node, N processes: any `moslim` stage under torchrun with the same config + parallel.* overrides.
#   launchers/torchrun.sh NPROC <moslim args...>
#   launchers/torchrun.sh 8 rm train --config configs/rm_world.yaml --out runs/rm parallel.tp=2
# gloo on CPU, NCCL on GPUs (chosen by moslim_mega.parallel.dist). Multi-node: see slurm/.
#
# Python: $MOSLIM_PYTHON if set, else the active virtualenv's, else this project's .venv (what
# `make demo` / `make test` create), else python3 on PATH. A fresh shell need not activate
# anything: the system python usually has no torch, which is why .venv comes before PATH.
set -euo pipefail
NPROC="${1:?usage: launchers/torchrun.sh NPROC <moslim args...>}"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${MOSLIM_PYTHON:-}" ]; then
  PY="$MOSLIM_PYTHON"; FROM="MOSLIM_PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY="$VIRTUAL_ENV/bin/python"; FROM="the active virtualenv"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"; FROM="the project's .venv"
else
  PY="$(command -v python3 || command -v python || true)"; FROM="PATH (no .venv at $ROOT)"
fi
echo "launchers/torchrun.sh: python $PY (from $FROM; set MOSLIM_PYTHON to choose another)" >&2
# find_spec does not import torch, so this costs milliseconds, and it turns a rank traceback
# ("No module named 'torch'") into one line that says what to do.
if [ -z "$PY" ] || ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"; then
  echo "launchers/torchrun.sh: ${PY:-no python found} cannot import torch: run \`make install\` (creates $ROOT/.venv)" \
       "or set MOSLIM_PYTHON to an interpreter with this package installed" >&2
  exit 1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # N processes share the cores
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m moslim_mega.cli "$@"
