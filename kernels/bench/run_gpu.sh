#!/usr/bin/env bash
# GPU checks of issue 7, for a session lent the H100/H200 machine. From the repo root:
#     bash kernels/bench/run_gpu.sh [all|tests|head|logprob|fp8|megatron]     # default all
# Writes into $OUT (the device tool's folder), else ./bench_out: summary.txt (one line per step
# with exit code and wall time), each step's log, and the JSON of each benchmark.
# Step limits sum to 540 s so that `all` fits one 600 s device command: tests 170 s (kernels, and
# the quick demo trained on CUDA), head bench 110 s, log-prob bench 260 s (eager at V=152k and
# torch.compile warm-up are the slow parts);
# rerun a single step if one is cut off. `fp8` (issue 16: bf16 vs float8 training step of a ~1B
# Qwen2-shaped model, 300 s) is its own command and not part of `all`, which would then overrun
# one device command; it needs torchao (carried by fetch_wheels.sh). `megatron` (issue 17: the
# megatron engine's GPU tests, 120 s, then the torch path vs the megatron engine in bf16 and, where
# transformer_engine is installed, in TE FP8 (--fp8 tensorwise) on a ~1B Qwen2-shaped model, 420 s)
# is its own command too; it needs megatron-core (pip install -e '.[megatron]').
set -u
WHAT="${1:-all}"
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels (fetch_wheels.sh): Liger-Kernel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MOSLIM_KERNELS=auto TRITON_DEFAULT_FP_FUSION=1
PY="${PYTHON:-python}"
summary="$OUT/summary.txt"
step() {  # step NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall_s=$((SECONDS - t0))" | tee -a "$summary"
}
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$summary"
if [[ "$WHAT" == all || "$WHAT" == tests ]]; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    step gpu_tests 170 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/test_demo.py tests/parallel/test_planner.py
  else
    echo "gpu_tests skipped: pytest not importable on this machine" | tee -a "$summary"
  fi
fi
if [[ "$WHAT" == all || "$WHAT" == head ]]; then
  step bench_multihead_head 110 "$PY" kernels/bench/bench_multihead_head.py --out "$OUT/bench_multihead_head.json"
fi
if [[ "$WHAT" == all || "$WHAT" == logprob ]]; then
  step bench_linear_logprob 260 "$PY" kernels/bench/bench_linear_logprob.py --out "$OUT/bench_linear_logprob.json"
fi
if [[ "$WHAT" == fp8 ]]; then
  step bench_fp8 300 "$PY" kernels/bench/bench_fp8.py --out "$OUT/bench_fp8.json"
fi
if [[ "$WHAT" == megatron ]]; then
  step megatron_gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/engine/megatron/test_engine_gpu.py
  # --fp8: bf16 and TE FP8 (current scaling per tensor) megatron side by side; a line says it was
  # skipped where transformer_engine is not installed.
  step bench_megatron 420 "$PY" kernels/bench/bench_megatron.py --fp8 tensorwise --out "$OUT/bench_megatron.json"
fi
cat "$summary"
