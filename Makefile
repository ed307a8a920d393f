# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if there is none.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch (a local file on kiln's dev and CI machines); any torch >= 2.11 works.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.kiln-installed
LINTERS := $(VENV)/.kiln-linters

.PHONY: demo test conformance lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kiln demo

test: $(STAMP)
	$(PY) -m pytest -q

conformance: $(STAMP)
	$(PY) tools/conformance.py

# The linters are installed once (pinned in pyproject's `lint` extra), not on every run.
$(LINTERS): pyproject.toml | $(STAMP)
	$(PY) -m pip install -q -e ".[test,lint]"
	touch $(LINTERS)

lint: $(LINTERS)
	$(VENV)/bin/ruff check src tests tools benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) out .pytest_cache
