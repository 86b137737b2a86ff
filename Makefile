# trashsort: `make setup && make train` (and, with the export issue, `make export-mobile`), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
DATA ?= $(SHARED)/datasets/trashnet
MODEL ?= mobilenetv3_small
ARGS ?=

# Offline here: use the local ImageNet weights in ../shared when they exist (else the Hub).
ifneq ($(wildcard $(SHARED)/weights),)
export TRASHSORT_WEIGHTS_DIR ?= $(abspath $(SHARED)/weights)
endif

.PHONY: setup train evaluate test lint clean

# CPU-only torch comes from constraints.txt (torch==2.13.0+cpu); without it pip pulls CUDA builds.
setup: $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[export,dev]"
	$(BIN)/python -m pip check
	$(BIN)/python -c "import pipeline, timm, torch; print('ok: torch', torch.__version__, 'timm', timm.__version__)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

train:
	$(BIN)/trashsort train --data $(DATA) --model $(MODEL) $(ARGS)

evaluate:
	$(BIN)/trashsort evaluate runs/latest $(ARGS)

lint:
	$(BIN)/ruff check pipeline edge tests

test: lint
	$(BIN)/python -m pytest -q -p no:anyio $(ARGS)

clean:
	rm -rf runs dist .pytest_cache .ruff_cache
