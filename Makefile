# meddiffuse — one venv, embedded defaults, offline.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench bench-full clean

install: $(STAMP)

# Re-runs are no-ops: the stamp is newer than the files that define the install.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m meddiffuse.demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench --scale small

bench-full: install
	$(BIN)/python -m bench --scale full

clean:
	rm -rf .meddiffuse .pytest_cache
