# Two commands on a fresh machine, CPU or GPU alike. Each makes or reuses the project's environment
# (.venv, with the torch build this machine needs: scripts/setup.sh), then:
#
#   make repro    run the default pipeline (dvc repro)
#   make test     lint, then every test, the slow ones too, with 1 thread and again with 2 (what CI runs)
#
# With the environment made, `.venv/bin/pytest` runs the fast tests alone.
VENV := .venv
BIN := $(VENV)/bin
# dvc runs each stage's `python -m ...` from PATH: the environment's python
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: env repro test

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	sh scripts/setup.sh $(VENV)

repro: env
	dvc repro

# The suite twice: float sums split over 1 thread and over 2 differ in their last bits, as on
# another CPU, and no test may depend on where a trajectory goes (tests/conftest.py, THREADS).
test: env
	ruff check .
	ruff format --check .
	OMP_NUM_THREADS=1 python -m pytest -q -m "slow or not slow"
	# the clusters' tests (Ray, Slurm) once: their tasks run in processes of their own, whatever this thread count
	OMP_NUM_THREADS=2 python -m pytest -q -m "(slow or not slow) and not cluster"
