# Two commands a fresh machine needs (README): `make run` and `make test`.
# Each creates the virtual environment on first use and installs the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch: on this workplace it lies on disk; never pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

.PHONY: install run test
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m simulations.run $(ARGS)

test: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS)
