#!/usr/bin/env bash
# GPU checks of issue 7 in one go, for a session lent the H100/H200 machine. From the repo root:
#     bash kernels/bench/run_gpu.sh          # writes into $OUT (the device tool's folder), else ./bench_out
# Runs the @pytest.mark.gpu kernel tests, then both benchmarks at the shapes (bf16); every
# step's log and JSON land in $OUT, and summary.txt has one line per step with its exit code.
# Budget: ~1 min tests + ~1 min head bench + ~3-5 min log-prob bench (eager at V=152k is the slow part).
set -u
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MOSLIM_KERNELS=auto
PY="${PYTHON:-python}"
summary="$OUT/summary.txt"
: > "$summary"
step() {  # step NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall_s=$((SECONDS - t0))" | tee -a "$summary"
}
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$summary"
if "$PY" -c "import pytest" 2>/dev/null; then
  step gpu_tests 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels
else
  echo "gpu_tests skipped: pytest not importable on this machine" | tee -a "$summary"
fi
step bench_multihead_head 240 "$PY" kernels/bench/bench_multihead_head.py --out "$OUT/bench_multihead_head.json"
step bench_linear_logprob 420 "$PY" kernels/bench/bench_linear_logprob.py --out "$OUT/bench_linear_logprob.json"
cat "$summary"
