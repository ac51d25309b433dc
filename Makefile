# bnjax: `make demo` trains the example, `make test` runs the suite, `make bench` the benchmark.
# Each target creates .venv and installs what it needs on first use.
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bnjax-installed
EXTRAS := test,examples,bench

.PHONY: install test demo bench clean

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile tests bnjax README.md

demo: $(STAMP)
	$(PY) -m bnjax_examples.main --config=configs/default.py --workdir=workdir/default

bench: $(STAMP)
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) workdir .pytest_cache
