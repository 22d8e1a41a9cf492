# lightscale: `make train` and `make test` set everything up in .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first. The default is the CPU build; for CUDA use e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/experiment/digits.yaml
ARGS ?=
PYTEST_ARGS ?=
RUN ?=
RESOURCES ?=
SBATCH ?=
SLURM_STATE_DIR ?= /tmp/lightscale-slurm
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install train test test-slow test-slurm test-all lint format bench sync sync-watch report preflight submit slurm-up slurm-down clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP) ## Create .venv and install lightscale with its dev tools

train: $(STAMP) ## Train the default experiment (CONFIG=..., ARGS="--trainer.max_epochs 5")
	$(BIN)/lightscale fit --config $(CONFIG) $(ARGS)

test: $(STAMP) ## Run the default test suite (no slow, no SLURM)
	$(BIN)/pytest -m "not slow and not slurm and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP) ## Run the slow tests (kill -9 resume trials, multi-process runs)
	$(BIN)/pytest -m "slow and not slurm and not gpu" $(PYTEST_ARGS)

test-slurm: $(STAMP) ## Run the tests against a real local SLURM cluster (root; installs slurm-wlm)
	$(BIN)/pytest -m "slurm" $(PYTEST_ARGS)

test-all: $(STAMP) ## Run every test (GPU tests skip without a GPU)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP) ## Lint with ruff
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP) ## Format and auto-fix with ruff
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP) ## Run the benchmarks and print one table (numbers go into the README)
	$(BIN)/python benchmarks/run_all.py

sync: $(STAMP) ## Upload every offline W&B run under runs/ (needs `wandb login` or WANDB_API_KEY)
	$(BIN)/lightscale sync runs

sync-watch: $(STAMP) ## On a login node: keep uploading the offline W&B runs under runs/ while their jobs run
	$(BIN)/lightscale sync --watch runs

report: $(STAMP) ## Write report.md + plots for RUN (default: the newest run with results); RUN="dir1 dir2" compares
	$(BIN)/python -m lightscale.report $(RUN)

preflight: $(STAMP) ## Check a SLURM job before it queues (CONFIG=..., RESOURCES="--nodes=2 --ntasks-per-node=4 --gpus-per-node=4")
	$(BIN)/lightscale preflight --sbatch slurm/train.sbatch --from-slurm $(RESOURCES) --config $(CONFIG) $(ARGS)

submit: $(STAMP) ## Preflight, then sbatch slurm/train.sbatch (CONFIG=..., SBATCH="--nodes=2 --time=12:00:00", ARGS=...)
	PATH="$(CURDIR)/$(BIN):$$PATH" slurm/submit.sh $(SBATCH) $(CONFIG) $(ARGS)

slurm-up: ## Start a local 2-node SLURM test cluster (root; apt-installs slurm-wlm + munge if missing)
	tests/cluster/slurm_up.sh $(SLURM_STATE_DIR)
	@echo 'then: export SLURM_CONF=$(SLURM_STATE_DIR)/slurm.conf'

slurm-down: ## Stop the local SLURM test cluster (only the daemons slurm-up started)
	tests/cluster/slurm_down.sh $(SLURM_STATE_DIR)

clean: ## Remove the virtualenv, caches and runs/
	rm -rf $(VENV) .pytest_cache .ruff_cache runs wandb lightning_logs src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
