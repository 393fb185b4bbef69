# Two commands set everything up: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
HOST ?= 127.0.0.1
PORT ?= 8501
# The inner loop: unit tests only (registered markers in pyproject.toml).
FAST := not train and not subprocess and not browser and not slow
# pytest-xdist workers; a module's tests stay together (they share its fixtures). The tests
# give each worker its share of the cores (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: run test test-fast lint install install-dev train-demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The tested pins first, then this package (editable, provides the `fer` command) without
# letting pip resolve anything beyond them.
$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -e .
	touch $@

$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(BIN)/pip install -r requirements-dev.txt
	touch $@

install: $(STAMP)

install-dev: $(DEV_STAMP)

run: $(STAMP)
	$(BIN)/python -m fer_core demo-data
	$(BIN)/streamlit run streamlit_app.py --server.address $(HOST) --server.port $(PORT)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -q tests -m "$(FAST)"

lint: $(DEV_STAMP)
	$(BIN)/ruff check fer_core pages tests bench streamlit_app.py

train-demo: $(STAMP)
	$(BIN)/python -m fer_core train --data demo --epochs 3

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
