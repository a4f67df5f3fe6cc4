# lagbias_mpi: `make run` trains on the built-in simulation, `make test` runs all tests.
# Both create .venv and install what is needed (scripts/setup_env.sh) on first use.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.lagbias_installed
NP      ?= 2
MPIRUN  := mpirun --allow-run-as-root --oversubscribe
PYTEST  := $(PY) -m pytest -p no:cacheprovider --color=no --with-mpi
# Wall-clock bound of each test stage of `make test` (each test also has its own pytest timeout):
# a stage still running after TEST_TIMEOUT seconds is sent SIGTERM, then SIGKILL 30 s later.
TEST_TIMEOUT ?= 1500
TIMEOUT := timeout -k 30 $(TEST_TIMEOUT)
export OMP_NUM_THREADS := 1
export OPENBLAS_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
export HDF5_USE_FILE_LOCKING := FALSE

# PFFT release tarball for `make pfft` (pfft-python without internet); beside CI's checkout
PFFT_TARBALL ?= $(wildcard ../shared/vendor/pfft/pfft-1.0.8-alpha2-fftw3.tar.gz)

.PHONY: setup run test test-serial test-mpi bench info clean pfft

$(STAMP): setup.py requirements.txt scripts/setup_env.sh
	bash scripts/setup_env.sh

setup: $(STAMP)

# pfft-python (second FFT backend): a no-op when it imports or when no PFFT tarball is at hand
pfft: $(STAMP)
	PFFT_TARBALL="$(PFFT_TARBALL)" PY=$(PY) bash scripts/build_pfft.sh

run: $(STAMP)
	$(MPIRUN) -n $(NP) $(PY) -m lagbias_mpi.train --config configs/default.yaml

test: test-serial test-mpi

test-serial: $(STAMP) pfft
	$(TIMEOUT) $(PYTEST) -q tests

test-mpi: $(STAMP) pfft
	$(TIMEOUT) $(MPIRUN) -n 2 sh scripts/pytest_rank.sh $(PYTEST) -q -m mpi tests
	$(TIMEOUT) $(MPIRUN) -n 3 sh scripts/pytest_rank.sh $(PYTEST) -q -m mpi tests

bench: $(STAMP)
	$(MPIRUN) -n 1 $(PY) -m lagbias_mpi.bench --out runs/bench

info: $(STAMP)
	$(PY) -m lagbias_mpi.info

clean:
	rm -rf runs build *.egg-info
