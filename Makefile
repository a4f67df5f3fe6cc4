# lagbias_mpi: `make run` trains on the built-in simulation, `make test` runs all tests.
# Both create .venv and install what is needed (scripts/setup_env.sh) on first use.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.lagbias_installed
NP      ?= 2
MPIRUN  := mpirun --allow-run-as-root --oversubscribe
PYTEST  := $(PY) -m pytest -p no:cacheprovider --color=no --with-mpi
export OMP_NUM_THREADS := 1
export OPENBLAS_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
export HDF5_USE_FILE_LOCKING := FALSE

.PHONY: setup run test test-serial test-mpi bench info clean

$(STAMP): setup.py requirements.txt scripts/setup_env.sh
	bash scripts/setup_env.sh

setup: $(STAMP)

run: $(STAMP)
	$(MPIRUN) -n $(NP) $(PY) -m lagbias_mpi.train --config configs/default.yaml

test: test-serial test-mpi

test-serial: $(STAMP)
	timeout -k 30 1500 $(PYTEST) -q tests

test-mpi: $(STAMP)
	timeout -k 30 1500 $(MPIRUN) -n 2 sh scripts/pytest_rank.sh $(PYTEST) -q -m mpi tests
	timeout -k 30 1500 $(MPIRUN) -n 3 sh scripts/pytest_rank.sh $(PYTEST) -q -m mpi tests

bench: $(STAMP)
	$(MPIRUN) -n 1 $(PY) -m lagbias_mpi.bench --out runs/bench

info: $(STAMP)
	$(PY) -m lagbias_mpi.info

clean:
	rm -rf runs build *.egg-info
