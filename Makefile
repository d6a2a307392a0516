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

# A second `make sweep` resumes the same sweep (finished trials are not rerun) and rebuilds its report.
SWEEP_NAME ?= $(notdir $(basename $(SWEEP)))
sweep: install
	@if [ -f ray_results/$(SWEEP_NAME)/sct_sweep.json ]; then \
	  echo "sweep $(SWEEP_NAME) exists: resuming it (a new one: make sweep SWEEP_NAME=other)"; \
	  $(VENV)/bin/sct-sweep resume $(SWEEP_NAME); \
	else $(VENV)/bin/sct-sweep run $(SWEEP) --name $(SWEEP_NAME); fi

ui: install
	$(VENV)/bin/sct-sweep ui

report: install
	$(VENV)/bin/sct-sweep report $(notdir $(basename $(SWEEP)))

lint: install
	$(VENV)/bin/ruff check sct_sweeps trainer dashboards tests bench

# On a GPU machine: the trainer's tests on CUDA + bench/gpu_bench.py, ~5 min, results in GPU_OUT.
# No install: it uses that machine's own torch (and bench/wheels from scripts/gpu_wheels.sh for pydantic).
GPU_OUT ?= reports/gpu-check
.PHONY: gpu-check
gpu-check:
	bash bench/gpu_check.sh $(GPU_OUT)

# Paper-reproduction targets (scripts/reproduce.sh; experiments/*.yaml). DRY_RUN=1 prints the plan
# and runs nothing; QUICK=1 runs the <= 20-minute version of a Fashion-MNIST target. The GPU targets
# stop at once with a one-line reason without a CUDA GPU, the data (DATA_ROOT=...) or the Inception
# weights (INCEPTION_WEIGHTS=...). PRETRAINED=<EDM/EDM2 .pkl> tunes from NVIDIA's published network
# (no pretraining; see README "Start from published checkpoints").
REPRODUCE := bash scripts/reproduce.sh
.PHONY: reproduce-digits reproduce-fmnist-ect-vs-sct reproduce-fmnist-scaling \
        reproduce-cifar10-ect reproduce-cifar10-sct reproduce-imagenet64-sct

reproduce-digits: install
	$(REPRODUCE) digits

reproduce-fmnist-ect-vs-sct: install
	$(REPRODUCE) fmnist-ect-vs-sct

reproduce-fmnist-scaling: install
	$(REPRODUCE) fmnist-scaling

reproduce-cifar10-ect: install
	$(REPRODUCE) cifar10-ect

reproduce-cifar10-sct: install
	$(REPRODUCE) cifar10-sct

reproduce-imagenet64-sct: install
	$(REPRODUCE) imagenet64-sct
