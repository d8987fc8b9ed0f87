# Two commands for a new user: `make reproduce` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test reproduce quick bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# two pytest-xdist workers (one per core of the CI machine), each taking whole test files, so that a
# module's shared fixture (the fig1 sources' quick runs, the two-process cluster) runs once
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

reproduce: $(STAMP)
	$(VENV)/bin/iclsim run all

quick: $(STAMP)
	$(VENV)/bin/iclsim run all --quick --out results/quick

bench: $(STAMP)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) results .pytest_cache
