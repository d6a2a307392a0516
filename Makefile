# sct-sweeps: install, test, sweep, UI and paper-reproduction targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SWEEP  ?= experiments/scaling.yaml

.PHONY: install test test-fast sweep ui lint report data

install: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data:
	@bash scripts/install_fmnist.sh
	@bash scripts/install_chromium.sh

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

sweep: install
	$(VENV)/bin/sct-sweep run $(SWEEP)

ui: install
	$(VENV)/bin/sct-sweep ui

report: install
	$(VENV)/bin/sct-sweep report $(notdir $(basename $(SWEEP)))

lint: install
	$(VENV)/bin/ruff check sct_sweeps trainer dashboards tests bench
