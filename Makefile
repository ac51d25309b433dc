# bnjax: `make demo` trains the example, `make test` runs the suite, `make bench` the benchmark,
# `make lint` checks style and types, `make docs` builds the API reference,
# `make experiments` tests the literature's claims and regenerates their FINDINGS.md.
# Each target creates .venv and installs what it needs on first use.
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bnjax-installed
EXTRAS := test,examples,bench
LINT_STAMP := $(VENV)/.bnjax-lint-installed
DOCS_STAMP := $(VENV)/.bnjax-docs-installed
# What ruff checks; add a folder once `ruff check` passes on it. pyright checks `bnjax/`.
RUFF_PATHS := bnjax conftest.py docs tests/test_readme.py tests/test_packaging.py \
    bnjax_examples/experiments tests/experiments configs/experiments

EXPERIMENTS := training_speed bias_gradient bias_gradient_norms stop_gradient relu_order precise_statistics \
    unbiased_variance unbiased_variance_cnn batch_renorm batch_renorm_non_iid dropout_shift small_batch \
    whitening covariate_shift
EXPERIMENTS_DIR := bnjax_examples/experiments

.PHONY: install test demo bench lint docs clean experiments

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

$(LINT_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e '.[lint]'
	touch $@

$(DOCS_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e '.[docs]'
	touch $@

install: $(STAMP)

# Three workers on two cores: a worker waiting on a subprocess (the 512-device compile, the
# benchmark smoke run, the two-process cluster) leaves a core to the others.
test: $(STAMP)
	$(PY) -m pytest -n 3 --dist loadfile tests bnjax README.md

demo: $(STAMP)
	$(PY) -m bnjax_examples.main --config=configs/default.py --workdir=workdir/default

bench: $(STAMP)
	$(PY) benchmarks/bench.py

# Each experiment writes result.json and plot.png to $(EXPERIMENTS_DIR)/results/<name>/; FINDINGS.md
# is generated from them.
experiments: $(STAMP)
	for name in $(EXPERIMENTS); do \
	  $(PY) -m bnjax_examples.experiments --config=configs/experiments/$$name.py \
	      --workdir=$(EXPERIMENTS_DIR)/results/$$name || exit 1; \
	done
	$(PY) -m bnjax_examples.experiments.findings --results=$(EXPERIMENTS_DIR)/results \
	    --output=$(EXPERIMENTS_DIR)/FINDINGS.md

# Both checks run, so one call lists every finding; the target fails if either does.
lint: $(LINT_STAMP)
	@status=0; \
	$(VENV)/bin/ruff check $(RUFF_PATHS) || status=1; \
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(VENV)/bin/pyright --pythonpath $(PY) bnjax || status=1; \
	exit $$status

# Warnings are errors; the pages land in docs/_build/html (index.html).
docs: $(DOCS_STAMP)
	rm -rf docs/_autosummary
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) workdir .pytest_cache docs/_build docs/_autosummary build dist
