# The two commands a person needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ferpipe-installed

.PHONY: setup test run compile images push bench clean

setup: $(STAMP)

# Re-installs when the dependency list or the lock changes.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# The demo set has 6 pseudo-subjects: 6 leave-one-subject-out folds (30 member trainings), then the
# final model (5 more) registered in runs/demo/mlflow.db. Measured on two CPU cores before training looped over
# train_on_batch (2x faster per epoch, not re-measured since): 24.6 min (cross-validation 19.8, final model 4.8).
