# polyhead: `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What the tests need: the trainer (torch CPU build), the server, the client, MiniGrid and dev tools.
EXTRAS := train,serve,client,minigrid,dev
STAMP := $(VENV)/.polyhead-installed

.PHONY: setup demo test test-fast lint format proto bench clean help

help:
	@echo "make setup   create .venv (if missing) and install polyhead[$(EXTRAS)]"
	@echo "make demo    train, serve, simulate and adapt on the default suite (writes ./demo-report)"
	@echo "make test    the whole test suite"
	@echo "make lint    ruff (format + lint) and mypy strict"
	@echo "make proto   regenerate the checked-in gRPC stubs from proto/"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: setup
	$(BIN)/polyhead demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: setup
	$(BIN)/python -m polyhead.protogen

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
