# Every target works on a fresh clone with only Python 3 and pip: it creates .venv and installs
# the package (editable) with the extra it needs, pinned by requirements/constraints.txt.
# A stamp per extra makes re-runs skip the install until setup.cfg or the pins change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt
PYTEST_ARGS ?=
# make demo WEIGHTING=dwa (or uncertainty, rlw, gls; several, comma-separated, are compared).
WEIGHTING ?= equal
# gloo's network interface for the 2-process demo: the loopback device (lo0 on macOS).
GLOO_IFNAME ?= lo

.PHONY: test lint bench demo demo-ddp docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-%: setup.cfg setup.py $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -c $(CONSTRAINTS) -e '.[$*]'
	touch $@

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check losses tests benchmarks demo docs
	$(BIN)/ruff format --check losses tests benchmarks demo docs
	$(BIN)/mypy

demo: $(VENV)/.installed-demo
	$(BIN)/python -m demo --weighting $(WEIGHTING)

demo-ddp: $(VENV)/.installed-demo
	GLOO_SOCKET_IFNAME=$(GLOO_IFNAME) OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node=2 -m demo

bench: $(VENV)/.installed-test $(VENV)/.installed-demo
	$(BIN)/python -m benchmarks.run --output docs/performance.md

docs: $(VENV)/.installed-docs
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build
