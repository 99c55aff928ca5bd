# Two commands do everything (see README):
#   make workbook   create .venv, run the whole notebook series on the local cloud -> build/
#   make test       create .venv, run the test suite (which also runs the series, small)
#   make course     build the student and instructor notebooks -> build/course/{student,instructor}
#   make lab        JupyterLab on notebooks/ (as root too, e.g. in a container)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install workbook workbook-ci test lab course bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

# Outputs are stripped when a notebook is staged (the filter named in .gitattributes), so a
# student who ran the lab never commits outputs and `git pull` does not conflict.
install: $(STAMP)
	-git config filter.nbstripout.clean "$(CURDIR)/$(BIN)/nbstripout"
	-git config filter.nbstripout.smudge cat
	-git config filter.nbstripout.required true
	-git config diff.ipynb.textconv "$(CURDIR)/$(BIN)/nbstripout -t"

workbook: $(STAMP)
	$(BIN)/python ci/run_workbook.py

workbook-ci: $(STAMP)
	$(BIN)/python ci/run_workbook.py --ci

test: install
	$(BIN)/python -m pytest

# Jupyter refuses to start as root unless told; root is common in containers and VMs.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: install
	$(BIN)/jupyter lab $(ROOT_FLAG) notebooks/

course: $(STAMP)
	$(BIN)/python -m helpers.course.build

bench: $(STAMP)
	$(BIN)/python bench/run_bench.py
	$(BIN)/python bench/bench_scale.py

clean:
	-$(BIN)/python -m helpers.local_cloud stop
	rm -rf build
