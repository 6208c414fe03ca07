# Two commands do all the set-up on a fresh Debian machine:
#   make demo   # FM-Defense on the shipped model: clean vs FGSM images
#   make test   # fast test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: data demo test test-all test-model lint train evaluate clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(STAMP)

# Fashion-MNIST: found, or installed (Debian package as root) or downloaded; see the script.
data: $(STAMP)
	PYTHON=$(PY) bash scripts/get_data.sh

demo: data
	$(PY) scripts/demo.py --model saved_models/fmnist --n 200

test: data $(STAMP_DEV)
	$(PY) -m pytest -q

test-all: data $(STAMP_DEV)
	$(PY) -m pytest -q -m ""

# Rebuilds the quick model that the tests load (tests/quick_model.py), after a change of what
# scripts/train.py writes; a stale copy is not used (the tests train one, a minute slower).
test-model: data $(STAMP_DEV)
	$(PY) tests/quick_model.py

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check fmd_tf scripts tests

# Trains a new Fashion-MNIST defense (29 min on 2 CPU cores: results/training/model_card.json)
# next to the shipped one; `make train OUT=DIR` chooses the directory. The shipped model was built with
# `python scripts/train.py --dataset fmnist --overwrite`.
OUT ?= saved_models/fmnist_trained
train: data
	$(PY) scripts/train.py --dataset fmnist --out $(OUT)

clean-venv:
	rm -rf $(VENV)
