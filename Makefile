# Two commands for a new user: `make reproduce` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast test-slow reproduce quick bench docs docs-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test ! -f $(RUN_STAMP) || $(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP) $(RUN_STAMP)

# reproduce and quick need the package alone, and not the bytecode of every installed module (pip compiles all
# of jax, jaxlib, numpy and matplotlib, used or not: 17 of a fresh install's 26 s; imports then compile what they
# use, about 1.5 s more per process where PYTHONDONTWRITEBYTECODE is set). The suite starts many processes, so
# the test stamp compiles the bytecode after such an install (docs/performance.md §5, §6)
RUN_STAMP := $(VENV)/.installed-run
$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -e .
	touch $(RUN_STAMP)

# two pytest-xdist workers (one per core of the CI machine), each taking whole test files, so that a
# module's shared fixture (the fig1 sources' quick runs, the two-process cluster) runs once
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

# the inner loop's tier, under a minute: the contract (protocols), the designs, the precision rules and the
# Monte Carlo referee's draw blocks and named streams; no training, no experiment. `make test` runs everything.
FAST := tests/test_precision.py tests/test_designs.py tests/test_protocols.py \
	tests/test_layout.py::test_block_sums_are_the_first_count_draws_of_the_block_stream \
	tests/test_layout.py::test_named_streams_keep_the_experiments_keys \
	tests/test_layout.py::test_bayes_risk_does_not_depend_on_the_batch

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile $(FAST)

# the slow tier: every experiment's quick study end to end, the guide's worked examples, the two-process
# cluster, the installed wheel (make test checks no packaging), a failing or killed --jobs worker, the fuzzed
# cases of checks make test runs once, the tutorials (with the docs extra), the long layout cases; their
# library pieces are in make test. Run it before a release.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n 2 --dist loadfile

# two experiments at once, longest first, each in a worker with every CPU device (the numbers are those of a sequential run:
# tests/test_trust_round2.py; the measured times: docs/performance.md §5)
reproduce: $(RUN_STAMP)
	$(VENV)/bin/iclsim run all --jobs 2

quick: $(RUN_STAMP)
	$(VENV)/bin/iclsim run all --quick --out results/quick

bench: $(STAMP)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) benchmarks/run.py

# the documentation site into site/ (open site/index.html): strict, so a warning, a broken link or a public
# name without a docstring fails; the four tutorials are executed (ICLSIM_DOCS_EXECUTE=0 skips that)
DOCS_STAMP := $(VENV)/.docs-installed

# one pip run for both extras (a fresh venv: 40 s against 61 s for the test extra, then the docs extra on top)
$(DOCS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test ! -f $(RUN_STAMP) || $(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
	$(PY) -m pip install -q -e '.[test,docs]'
	touch $(STAMP) $(RUN_STAMP) $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# CI's check of the site: the strict build (every page, link and public name) without executing the tutorials
# (they run in the slow tier, tests/test_docs.py), into a scratch folder
docs-check: $(DOCS_STAMP)
	rm -rf .site-check && ICLSIM_DOCS_EXECUTE=0 NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d .site-check && rm -rf .site-check

clean:
	rm -rf $(VENV) results .pytest_cache site
