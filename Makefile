# The two commands a person needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ferpipe-installed

.PHONY: setup test run compile bench clean

setup: $(STAMP)

# Re-installs when the dependency list or the lock changes.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# The demo set has 6 pseudo-subjects (6 leave-one-subject-out folds, 30 member
# trainings), sized so the whole DAG finishes on two CPU cores well inside 20 minutes.
run: setup
	$(BIN)/ferpipe demo-data --out data/demo-synthetic --subjects 6
	$(BIN)/ferpipe run --dataset jaffe --data data/demo-synthetic --network el --profile demo --out runs/demo

compile: setup
	$(BIN)/ferpipe compile --out pipelines/ferpipe.yaml

bench: setup
	$(BIN)/python benchmarks/preprocess_throughput.py

clean:
	rm -rf $(VENV) runs data/demo-synthetic
