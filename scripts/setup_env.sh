#!/usr/bin/env bash
# Create .venv (if missing) and install everything lagbias_mpi needs.
# Debian packages (Open MPI, FFTW) are installed with apt-get when run as root and missing.
# A supercomputer user skips this script: see README "Installing on a supercomputer".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.lagbias_installed

need_apt=()
command -v mpicc >/dev/null 2>&1 || need_apt+=(openmpi-bin libopenmpi-dev)
[ -e /usr/include/fftw3.h ] || need_apt+=(libfftw3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "[setup] missing system packages: ${need_apt[*]} (install MPI and FFTW, or load your site's modules)" >&2
    exit 1
  fi
fi

if [ ! -x $VENV/bin/python ]; then
  echo "[setup] creating $VENV"
  $PY -m venv $VENV
fi
if [ -f $STAMP ] && [ $STAMP -nt requirements.txt ] && [ $STAMP -nt setup.py ]; then
  exit 0
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
# torch: the CPU build (a bare 'torch' would pull a multi-GB CUDA build). Keep an existing torch.
if ! $VENV/bin/python -c "import torch" >/dev/null 2>&1; then
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q numpy cython mpi4py
# mpi4py-fft builds against the system FFTW; it needs numpy/cython/mpi4py at build time.
$PIP install -q --no-build-isolation mpi4py-fft
$PIP install -q -r requirements.txt
$PIP install -q --no-build-isolation --no-deps -e .
touch $STAMP
echo "[setup] environment ready in $VENV"
