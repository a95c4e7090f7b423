# Quick start: `make run` trains on the bundled sample, `make test` runs the test suite.
# Both create .venv and install the pinned dependencies on first use; later calls reuse it offline.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench sample clean-runs

# gradio goes in with --no-deps: it declares pillow<13, this project pins pillow 13 (see the serve extra)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,serve]'
	$(BIN)/pip install -q --no-deps gradio==6.31.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python run.py --arch resnet34 --epochs 10

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

sample: $(STAMP)
	$(BIN)/python run.py synth --out data/sample --format z2g --n-train 160 --n-test 24 --size 128 --seed 0

clean-runs:
	rm -rf runs
