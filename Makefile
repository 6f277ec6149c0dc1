# The two commands a person needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ferpipe-installed

.PHONY: setup test run lint compile bench clean

setup: $(STAMP)

# Re-installs when the dependency list or the lock changes.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

run: setup
	$(BIN)/ferpipe demo-data --out data/demo-synthetic
	$(BIN)/ferpipe run --dataset jaffe --data data/demo-synthetic --profile demo --out runs/demo

compile: setup
	$(BIN)/ferpipe compile --out pipelines/ferpipe.yaml

bench: setup
	$(BIN)/python benchmarks/preprocess_throughput.py

clean:
	rm -rf $(VENV) runs data/demo-synthetic
