# Two entry points for a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Both create or reuse the virtual environment in .venv; torch is installed first and pinned, so pip
# never pulls a multi-GB CUDA build; every other package gets the tested version of constraints.txt
# (`make CONSTRAINTS=/dev/null install` for the newest versions setup.py allows).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

.PHONY: install demo test clean-venv

install: $(STAMP)

$(STAMP): setup.py heartcascade/cli/__init__.py $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	grep -v '^torch==' $(CONSTRAINTS) > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/hc_demo

test: install
	$(BIN)/python -m pytest -q -rs tests

clean-venv:
	rm -rf $(VENV)
