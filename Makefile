# The two commands a person needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ferpipe-installed

.PHONY: setup test run compile images push lock bench clean

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
# final model (5 more) registered in runs/demo/mlflow.db. Measured on two CPU cores: 15.7 min (cross-validation
# 11.8, the final model 3.8), ensemble 92.86% on the synthetic faces.
run: setup
	$(BIN)/ferpipe demo-data --out data/demo-synthetic --subjects 6
	$(BIN)/ferpipe run --dataset jaffe --data data/demo-synthetic --network el --profile demo --out runs/demo

# The committed files derived from the code: the compiled DAG, the image tags that name it, README's picture.
compile: setup
	$(BIN)/python -m pipelines.refresh

# Both images, tagged by what goes into them (components/images.py), with Docker or Podman; on a host that
# cannot pull the base image, run as root, it is made from Debian packages first (docker/offline-base.sh).
images: setup
	docker/build.sh cpu gpu

push: images
	docker/build.sh --push cpu gpu

# The images' hashed package locks (docker/cpu.lock, docker/gpu.lock), after pyproject.toml or requirements.lock change.
lock: setup
	docker/lock.sh

bench: setup
	$(BIN)/python benchmarks/preprocess_throughput.py

clean:
	rm -rf $(VENV) runs data/demo-synthetic
