# README's two commands: `make test` and `make demo`. Both set up everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: test demo lint format system-deps venv

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . || $(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(STAMP)

# espeak-ng speaks the embedded corpus; installed with apt-get when we are root.
system-deps:
	@{ command -v espeak-ng >/dev/null 2>&1 && [ -d /usr/share/wordnet ]; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q espeak-ng wordnet-base; \
	  else echo "espeak-ng or wordnet-base is missing: run 'sudo apt-get install espeak-ng wordnet-base'" >&2; exit 1; fi; }

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

demo: $(STAMP) system-deps
	$(BIN)/python -m blspkd_jax.demo --workdir $(WORKDIR)

lint: $(STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .
