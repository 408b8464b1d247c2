# Two commands a newcomer needs: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test docs serve clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mac-attention synthetic

# pytest exits 5 when it collects nothing (e.g. a GPU-only selection): not a failure here
test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not gpu and not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis
