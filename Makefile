# Two commands do all the set-up on a fresh Debian machine:
#   make demo   # FM-Defense on the shipped model: clean vs FGSM images
#   make test   # fast test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: demo test test-all lint train evaluate clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --model saved_models/fmnist --n 200

test: $(STAMP_DEV)
	$(PY) -m pytest -q

test-all: $(STAMP_DEV)
	$(PY) -m pytest -q -m ""

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check fmd_tf scripts tests

train: $(STAMP)
	$(PY) scripts/train.py --dataset fmnist

clean-venv:
	rm -rf $(VENV)
