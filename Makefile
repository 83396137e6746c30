# Two commands do all the set-up on a fresh machine:
#   make train   — build .venv, then train on the built-in landscape demo set
#   make test    — build .venv, then run the test suite
# TORCH pins the torch build pip installs first (the CPU build where one lies on disk; a CUDA
# build on GPU machines). Later installs see it and keep it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install train test
# A TORCH different from the one .venv was built with reinstalls (.venv/.torch records it).
install:
	@test "$$(cat $(VENV)/.torch 2>/dev/null)" = "$(TORCH)" || rm -f $(VENV)/.installed
	@$(MAKE) --no-print-directory $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,deepspeed]" "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/.torch
	touch $@

train: install
	$(BIN)/accelerate launch --config_file launch_configs/accelerate/cpu.yaml bigan/train.py \
		--config launch_configs/experiments/demo.yaml $(ARGS)

# Tests run on every core (pytest-xdist), the Slurm ones on one worker (one throwaway cluster).
test: install
	$(BIN)/python -m pytest -q -n auto --dist loadgroup $(ARGS)
