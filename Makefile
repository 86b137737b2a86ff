# trashsort: `make setup && make export-mobile` (the main job), `make test`, `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
DATA ?= $(SHARED)/datasets/trashnet
MODEL ?= mobilenetv3_small
ARGS ?=
# export-mobile: CHECKPOINT=runs/<id> skips fine-tuning; TRAIN_ARGS / EXPORT_ARGS pass options on.
CHECKPOINT ?=
TRAIN_ARGS ?=
EXPORT_ARGS ?=
BUNDLE ?= $(shell ls -dt dist/*/ 2>/dev/null | head -n 1)

# Offline here: use the local ImageNet weights in ../shared when they exist (else the Hub).
ifneq ($(wildcard $(SHARED)/weights),)
export TRASHSORT_WEIGHTS_DIR ?= $(abspath $(SHARED)/weights)
endif

.PHONY: setup train evaluate export-mobile bench test test-android lint clean pi-rootfs validate

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

# data -> fine-tune (unless CHECKPOINT=...) -> .pte/.tflite/.onnx, fp32 + INT8 -> parity gate -> dist/
export-mobile:
ifeq ($(CHECKPOINT),)
	$(BIN)/trashsort train --data $(DATA) --model $(MODEL) $(TRAIN_ARGS)
	$(BIN)/trashsort export runs/latest $(EXPORT_ARGS)
else
	$(BIN)/trashsort export $(CHECKPOINT) $(EXPORT_ARGS)
endif

# PyTorch eager vs every artefact of the newest bundle (or BUNDLE=dist/...): bench.md + bench.png
bench:
	@test -n "$(BUNDLE)" || { echo "no bundle in dist/: run make export-mobile first"; exit 1; }
	$(BIN)/trashsort bench $(BUNDLE) --checkpoint $(or $(CHECKPOINT),runs/latest) $(ARGS)

# On-device check of the newest bundle on this machine (or BUNDLE=dist/...; ARGS="--model model_int8.tflite").
validate:
	@test -n "$(BUNDLE)" || { echo "no bundle in dist/: run make export-mobile first"; exit 1; }
	$(BIN)/python edge/classify.py --bundle $(BUNDLE) --validate $(ARGS)

# An emulated Raspberry Pi (arm64 Debian + ai-edge-litert, proot + qemu) for tests/test_edge_arm64.py.
pi-rootfs:
	bash .ci/pi-rootfs.sh

lint:
	$(BIN)/ruff check pipeline edge tests

# Python tests (pytest), then the Android core's JVM tests (prints "android core: N passed, N failed").
test: lint
	$(BIN)/python -m pytest -q -p no:anyio $(ARGS)
	$(MAKE) --no-print-directory test-android

# Kotlin core of android_demo/ on the JVM: kotlinc (npm), JUnit 4 + org.json (Debian), golden vectors.
test-android:
	PYTHON=$(abspath $(BIN)/python) bash android_demo/test-jvm.sh

clean:
	rm -rf runs dist .pytest_cache .ruff_cache
