# sdlearn — every target sets up what it needs in .venv first.
#   make test       unit + tiny-size parity tests + every notebook (nbval); installs the test set
#   make lab        open the notebooks in JupyterLab (a server: it runs until you stop it, Ctrl-C)
#   make test-full  the above plus the slow full-size SD v1.5 parity tests
#   make notebooks  execute every notebook in place (commit them executed)
#   make student    write the student edition of notebooks/ to student/ (solutions cleared, outputs
#                   cleared; nbgrader's preprocessors); refuses if student/ exists: OVERWRITE=1 replaces it
#   make figures    regenerate figures/*.png from the package
#   make bench      CPU benchmarks against diffusers and OpenVINO (installs the bench extra: openvino)
#   make mutation   mutation testing of the core modules: a seeded random sample of mutants, each
#                   run against its module's fast tests (MUTANTS=200 MUTATION_SEED=0; about 35 minutes)
#
# PyTorch is installed first, on its own, so you choose the build:
#   TORCH        what to ask pip for (default: torch). CI: TORCH=torch==2.13.0 (a local CPU wheel)
#   TORCH_INDEX  a package index for it, passed to pip as --index-url; the CPU-only build:
#                make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Without TORCH_INDEX, `pip install torch` on Linux fetches the CUDA build (several GB).

PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch
TORCH_INDEX ?=
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip

MUTANTS       ?= 200
MUTATION_SEED ?= 0

NBVAL  := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
PYTEST := $(PY) -m pytest -p no:cacheprovider

OVERWRITE ?=

.PHONY: install install-notebooks install-test install-classroom lab test test-full notebooks student figures bench mutation clean

install: install-test
install-notebooks: $(VENV)/.sdlearn-notebooks
install-test: $(VENV)/.sdlearn-test
install-classroom: $(VENV)/.sdlearn-classroom

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.sdlearn-torch: | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH)"
	touch $@

# The notebook set: sdlearn, JupyterLab, ipywidgets.
$(VENV)/.sdlearn-notebooks: pyproject.toml $(VENV)/.sdlearn-torch
	$(PIP) install -e ".[notebooks]"
	touch $@

# The test set adds the reference implementations (diffusers, transformers, the CompVis code).
$(VENV)/.sdlearn-test: pyproject.toml $(VENV)/.sdlearn-torch
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps "stable-diffusion-sdkit==2.1.5"
	touch $@

# The classroom set: the notebook set and nbgrader (the test set includes it too).
$(VENV)/.sdlearn-classroom: pyproject.toml $(VENV)/.sdlearn-torch
	$(PIP) install -e ".[notebooks,classroom]"
	touch $@

ROOTFLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: install-notebooks
	$(VENV)/bin/jupyter lab $(ROOTFLAG) notebooks/

# pytest exits with 5 when it collects no tests; that is not a failure of the code.
test: install-test
	$(PYTEST) -m "not full" $(NBVAL) tests notebooks; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-full: install-test
	$(PYTEST) $(NBVAL) tests notebooks; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

notebooks: install-notebooks
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1800 notebooks/*.ipynb

# The student edition: never written over a student/ that exists unless OVERWRITE=1 (it may hold work).
student: install-classroom
	$(PY) tools/student_edition.py --out student $(if $(OVERWRITE),--overwrite)

figures: install-notebooks
	$(PY) -m sdlearn.figures figures

# The bench set: the test set and OpenVINO, the benchmark's peer.
$(VENV)/.sdlearn-bench: pyproject.toml $(VENV)/.sdlearn-test
	$(PIP) install -e ".[bench]"
	touch $@

bench: $(VENV)/.sdlearn-bench
	$(PY) bench/run_cpu.py

# One mutant at a time, one thread each: see tools/mutation.py for the sampling and the rules.
mutation: install-test
	$(PY) tools/mutation.py --sample $(MUTANTS) --seed $(MUTATION_SEED)

clean:
	rm -rf .cache .pytest_cache .hypothesis
