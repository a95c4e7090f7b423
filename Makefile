# Quick start: `make run` trains on the bundled sample, `make test` runs the test suite.
# Both create .venv and install the locked versions (constraints.txt) on first use; later calls reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SETUP ?= $(STAMP)  # what a target needs first; `SETUP= BIN=...` uses another environment as it is
# `make wheels`: the folder, the extras, TORCH=0 to leave out torch, torchvision and the CUDA
# libraries (for an image that has them, as Kaggle's and Colab's do), PY_VERSION for another Python
WHEELS ?= wheels
EXTRAS ?=
TORCH ?= 1
PY_VERSION ?=
TORCH_PACKAGES := ^(torch|torchvision|triton|nvidia-.*|cuda-.*)$$
TARGET := $(if $(PY_VERSION),--python-version $(PY_VERSION) --only-binary=:all:)

.PHONY: run test bench sample clean-runs wheels newest lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,serve]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hpa-fastai --arch resnet34 --epochs 10

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

sample: $(STAMP)
	$(BIN)/hpa-fastai synth --out hpa_fastai/sample --format z2g --n-train 160 --n-test 24 --size 128 --seed 0

clean-runs:
	rm -rf runs

# Every wheel an offline install needs (a Kaggle notebook without internet): this project's and each
# dependency's at its locked version, resolved for hpa_fastai[EXTRAS]; install them with
# pip install --no-index --find-links $(WHEELS) hpa_fastai
wheels: $(SETUP)
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(WHEELS) .
	$(BIN)/pip install -q --dry-run --ignore-installed $(TARGET) --report $(WHEELS)/resolved.json \
		-c constraints.txt --find-links $(WHEELS) 'hpa_fastai$(if $(EXTRAS),[$(EXTRAS)])'
	$(BIN)/python -c 'import json, re, sys; skip = re.compile(sys.argv[2] if sys.argv[3] == "0" else "^$$"); \
		names = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.load(open(sys.argv[1]))["install"]]; \
		print("\n".join(f"{n}=={v}" for n, v in names if n.lower() != "hpa-fastai" and n.lower() != "hpa_fastai" \
		                and not skip.match(n.lower())))' $(WHEELS)/resolved.json '$(TORCH_PACKAGES)' '$(TORCH)' \
		> $(WHEELS)/requirements.txt
	$(BIN)/pip download -q --no-deps --only-binary=:all: $(TARGET) -d $(WHEELS) -r $(WHEELS)/requirements.txt
	rm $(WHEELS)/resolved.json
	@echo "$(WHEELS): $$(ls $(WHEELS)/*.whl | wc -l) wheels, $$(du -sh $(WHEELS) | cut -f1)"

# What a user gets: the newest releases the ranges allow, in a venv of its own, with a smoke test
# (CI runs it after the suite on the locked versions); the versions that differ from the lock are listed.
newest:
	rm -rf .venv-newest && $(PYTHON) -m venv .venv-newest
	.venv-newest/bin/pip install -q --upgrade pip
	.venv-newest/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[test]'
	.venv-newest/bin/pip freeze --exclude-editable | grep -v -x -F -f constraints.txt | sed 's/^/not as locked: /' || true
	.venv-newest/bin/python -m pytest -q -m 'not slow' tests/test_architecture.py tests/test_formats.py tests/test_trackers.py
	.venv-newest/bin/python -m pytest -q tests/test_install.py -k newest_smoke

# Regenerate constraints.txt from the newest releases the ranges allow (then run make test)
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q -e '.[test,serve]'
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock
