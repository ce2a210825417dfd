# Fresh machine → two commands: `make demo` and `make test`. Both create .venv and install
# everything they need (the CPU torch wheel first, then this package with its dev extras).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-gpu clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
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
