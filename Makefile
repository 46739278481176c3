# sdlearn — every target sets up what it needs in .venv first.
#   make lab        open the notebooks in JupyterLab
#   make test       unit + tiny-size parity tests + every notebook (nbval)
#   make test-full  the above plus the slow full-size SD v1.5 parity tests
#   make notebooks  execute every notebook in place (commit them executed)
#   make figures    regenerate figures/*.png from the package
#   make bench      CPU benchmarks against diffusers
# TORCH pins the torch build, e.g. `make test TORCH=torch==2.13.0` (what .ci/run does).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sdlearn-installed

NBVAL  := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: install lab test test-full notebooks figures bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps "stable-diffusion-sdkit==2.1.5"
	touch $@

ROOTFLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: install
	$(VENV)/bin/jupyter lab $(ROOTFLAG) notebooks/

# pytest exits with 5 when it collects no tests; that is not a failure of the code.
test: install
	$(PYTEST) -m "not full" $(NBVAL) tests notebooks; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-full: install
	$(PYTEST) $(NBVAL) tests notebooks; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

notebooks: install
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1800 notebooks/*.ipynb

figures: install
	$(PY) -m sdlearn.figures figures

bench: install
	$(PY) bench/run_cpu.py

clean:
	rm -rf .cache .pytest_cache .hypothesis
