# Two commands do everything (see README):
#   make workbook   create .venv, run the whole notebook series on the local cloud -> build/
#   make test       create .venv, run the test suite (which also runs the series, small)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install workbook workbook-ci test lab bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

workbook: $(STAMP)
	$(BIN)/python ci/run_workbook.py

workbook-ci: $(STAMP)
	$(BIN)/python ci/run_workbook.py --ci

test: $(STAMP)
	$(BIN)/python -m pytest

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP)
	$(BIN)/python bench/run_bench.py
	$(BIN)/python bench/bench_scale.py

clean:
	-$(BIN)/python -m helpers.local_cloud stop
	rm -rf build
