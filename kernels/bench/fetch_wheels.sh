#!/usr/bin/env bash
# Fetch, on the development machine, the wheels the GPU machine lacks for run_gpu.sh:
# Liger-Kernel (the benchmark's third-party baseline; pure Python + Triton) and torchao (float8
# training for bench_fp8.py; an abi3 wheel, any CPython >= 3.10). The GPU machine
# reaches no registry, so the device tool carries them: from the repo root,
#     bash kernels/bench/fetch_wheels.sh     # once; .whl/ is git-ignored via .git/info/exclude
#     device run: carry [".whl"], command "bash kernels/bench/run_gpu.sh"
set -eu
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "liger-kernel==0.8.5" "torchao==0.18.0"
ls -l .whl
