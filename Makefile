# hpcopt — two commands on a fresh machine:
#   make demo   creates .venv, installs, trains APTS-D on the built-in Poisson-2D PINN on 2 ranks
#   make test   creates .venv, installs, type-checks and lints, runs the whole suite (serial, then 2 and 4 ranks under mpiexec)
# Override: make demo TORCH=torch   (default torch==2.13.0, the CPU wheel of these machines)

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
NP     ?= 2
BIN     = $(VENV)/bin
MPIEXEC = $(BIN)/mpiexec
# A hung multi-rank run must fail, never block CI: pytest-timeout ends a test, this ends a run.
RUN_LIMIT ?= 900

.PHONY: install demo test test-serial test-mpi test-docs lint typecheck docs gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,mpich,plot]"
	touch $@

demo: install
	mkdir -p runs
	$(MPIEXEC) -n $(NP) $(BIN)/python -m mpi4py -m hpcopt train --config jobs/poisson2d_demo.toml \
		--out runs/demo.h5 --overwrite
	$(BIN)/python -m hpcopt analyze runs/demo.h5

test: install lint test-serial test-mpi test-docs

test-serial: install
	timeout $(RUN_LIMIT) $(BIN)/python -m pytest -q --with-mpi --ignore=tests/docs tests

# Every ```bash / ```python block of README.md and docs/, shortened (tests/docs; `make demo` as written).
test-docs: install
	timeout $(RUN_LIMIT) $(BIN)/python -m pytest -q -p no:cacheprovider tests/docs

test-mpi: install
	timeout $(RUN_LIMIT) $(MPIEXEC) -n 2 $(BIN)/python -m pytest -q --with-mpi -m mpi -p no:cacheprovider tests
	timeout $(RUN_LIMIT) $(MPIEXEC) -n 4 $(BIN)/python -m pytest -q --with-mpi -m mpi -p no:cacheprovider tests

lint: install typecheck
	$(BIN)/ruff check hpcopt tests benchmarks examples

# mypy reads mypy.ini: the package, benchmarks, examples and tests, with check_untyped_defs and warn_unused_ignores.
typecheck: install
	$(BIN)/mypy

# The <!-- options: NAME --> tables of the docs are generated from the option dataclasses.
docs: install
	$(BIN)/python -m hpcopt options --write-docs docs --write-docs README.md

# The GPU check (docs/gpu.md#the-gpu-check): measures on a GPU, dry-runs on CPU without one.
# Prepare what it carries with `bash benchmarks/gpu_wheels.sh`.  OUT=DIR keeps the results.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs *.egg-info
