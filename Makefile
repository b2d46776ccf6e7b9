# Two entry points on a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv in the repo root. torch is pinned and installed first, on its own: a loose
# torch requirement resolved first would pull a multi-GB CUDA build. On a GPU machine, override:
#   make run TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
ASSETS ?= $(or $(SPON_ASSETS),../shared/assets)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1

.PHONY: install run test clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/spon run --out out/run --eval-text $(ASSETS)/data/tinystories/sample.txt

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf out .pytest_cache
