# Two commands for a new user: `make reproduce` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test reproduce quick bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# two pytest-xdist workers (one per core of the CI machine); tests sharing a module fixture are grouped
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadgroup

reproduce: $(STAMP)
	$(VENV)/bin/iclsim run all

quick: $(STAMP)
	$(VENV)/bin/iclsim run all --quick --out results/quick

bench: $(STAMP)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) results .pytest_cache
