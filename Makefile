# Set-up and the two everyday commands. `make train` / `make test` create the virtual environment (.venv) and
# install the project on first use; later calls reuse it (it is rebuilt when pyproject.toml changes).
#   make train [ARGS="--steps 100"]      the built-in training run (python train.py)
#   make test  [ARGS="-k parity"]        the test suite (python -m pytest -q), what CI runs
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# PyTorch (the tests' reference) is pinned and installed first, so that the extras cannot pull another build.
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: train test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,tokenizers,tensorboard]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean-venv:
	rm -rf $(VENV)
