#!/usr/bin/env bash
# Install pfft-python into .venv without internet access to the PFFT sources.
#
# pfft-python's sdist builds the PFFT library (M. Pippig, with the FFTW 3 sources it needs) from
# depends/pfft-1.0.8-alpha3-fftw3-2don2d.tar.gz and downloads that file when it is absent (which
# fails on a machine without internet). This script fetches the pfft-python sdist from PyPI, puts
# the PFFT release tarball where its build looks for it (top folder renamed, repacked under the
# expected name) and installs it with --no-build-isolation (numpy, cython, mpi4py from .venv).
#
# The PFFT tarball: $PFFT_TARBALL, else ../shared/vendor/pfft/pfft-1.0.8-alpha2-fftw3.tar.gz
# beside the checkout. A no-op when pfft-python already imports; exits 0 with a message when no
# tarball is at hand (tests of the pfft backend are then skipped). On a machine with internet a
# plain `pip install --no-build-isolation pfft-python` works as well.
# Takes about 3 minutes on 2 cores (PFFT is built in double and single precision).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
VERSION=${PFFT_PYTHON_VERSION:-0.1.24}
EXPECTED=pfft-1.0.8-alpha3-fftw3-2don2d

if "$PY" -c "import pfft" >/dev/null 2>&1; then
  echo "[pfft] pfft-python already installed ($("$PY" -c 'import pfft, os; print(os.path.dirname(pfft.__file__))'))"
  exit 0
fi

TARBALL=${PFFT_TARBALL:-}
if [ -z "$TARBALL" ]; then
  for candidate in ../shared/vendor/pfft/pfft-1.0.8-alpha2-fftw3.tar.gz ../shared/vendor/pfft/pfft-*.tar.gz; do
    if [ -f "$candidate" ]; then TARBALL=$candidate; break; fi
  done
fi
if [ -z "$TARBALL" ] || [ ! -f "$TARBALL" ]; then
  echo "[pfft] no PFFT release tarball (set PFFT_TARBALL=/path/to/pfft-1.0.8-*.tar.gz, or place it in ../shared/vendor/pfft/):" \
       "pfft-python not installed, its tests will be skipped" >&2
  exit 0
fi
TARBALL=$(cd "$(dirname "$TARBALL")" && pwd)/$(basename "$TARBALL")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/build_pfft.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "[pfft] PFFT sources: $TARBALL"
echo "[pfft] downloading the pfft-python $VERSION sdist"
# --no-build-isolation: its metadata is prepared with the numpy/cython of .venv (otherwise pip
# would build those from source for it)
"$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$WORK/sdist" "pfft-python==$VERSION"
SDIST=$(ls "$WORK"/sdist/pfft*python-"$VERSION".tar.gz)
tar -xzf "$SDIST" -C "$WORK"
SRC=$(ls -d "$WORK"/pfft*python-"$VERSION")

# the PFFT release with its top folder renamed to what depends/install_pfft.sh configures
mkdir "$WORK/repack"
tar -xzf "$TARBALL" -C "$WORK/repack"
TOP=$(ls "$WORK/repack")
if [ "$(echo "$TOP" | wc -l)" != 1 ]; then
  echo "[pfft] $TARBALL must hold one top folder, found: $TOP" >&2
  exit 1
fi
[ "$TOP" = "$EXPECTED" ] || mv "$WORK/repack/$TOP" "$WORK/repack/$EXPECTED"
tar -czf "$SRC/depends/$EXPECTED.tar.gz" -C "$WORK/repack" "$EXPECTED"
rm -rf "$WORK/repack"

echo "[pfft] building PFFT and pfft-python (about 3 minutes on 2 cores)"
MAKEFLAGS=${MAKEFLAGS:-} "$PY" -m pip install -q --no-build-isolation --no-deps "$SRC"
"$PY" -c "import pfft; print('[pfft] installed pfft-python', '$VERSION')"
