# shellcheck shell=bash
# =====================================================================================
#  SITE SET-UP FOR lagbias_mpi BATCH JOBS  --  THE ONE PLACE TO EDIT PER MACHINE
# =====================================================================================
# Every sbatch script in jobs/ sources this file before it runs anything. Edit the block for
# your site (or set LAGBIAS_SITE before sbatch: `LAGBIAS_SITE=perlmutter-cpu sbatch ...`).
# It must define:
#   - the modules / compilers / MPI that mpi4py and mpi4py-fft were built against,
#   - the Python environment (venv) where lagbias_mpi is installed (`pip install -e .`),
#   - OMP_NUM_THREADS (1: lagbias_mpi is MPI-parallel; threads only oversubscribe the cores),
#   - LAGBIAS_SRUN_CPU / LAGBIAS_SRUN_GPU: extra srun flags for rank pinning,
#   - LAGBIAS_RUNS: where run directories go (a scratch file system, not $HOME).
# Nothing else in the job scripts is site specific.

LAGBIAS_SITE=${LAGBIAS_SITE:-generic}
LAGBIAS_ROOT=${LAGBIAS_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}   # the lagbias_mpi checkout
export LAGBIAS_ROOT

case "$LAGBIAS_SITE" in
  generic)
    # A generic Slurm cluster. Change: module names, venv path.
    # module load gcc openmpi fftw python            # <- your site's module names
    LAGBIAS_VENV=${LAGBIAS_VENV:-$LAGBIAS_ROOT/.venv}
    LAGBIAS_SRUN_CPU="--cpu-bind=cores"
    LAGBIAS_SRUN_GPU="--cpu-bind=cores --gpu-bind=single:1"
    LAGBIAS_RUNS=${LAGBIAS_RUNS:-${SCRATCH:-$LAGBIAS_ROOT}/lagbias_runs}
    ;;
  perlmutter-cpu)
    # NERSC Perlmutter CPU nodes (2 x 64-core AMD Milan, 512 GB). Cray MPICH: build mpi4py with
    # MPICC="cc -shared" pip install --no-binary=mpi4py mpi4py. Change: the venv path.
    # module load PrgEnv-gnu cray-fftw python
    LAGBIAS_VENV=${LAGBIAS_VENV:-$SCRATCH/lagbias_venv}
    LAGBIAS_SRUN_CPU="--cpu-bind=cores"
    LAGBIAS_SRUN_GPU="$LAGBIAS_SRUN_CPU"
    LAGBIAS_RUNS=${LAGBIAS_RUNS:-$SCRATCH/lagbias_runs}
    ;;
  perlmutter-gpu)
    # NERSC Perlmutter GPU nodes (1 x 64-core Milan, 4 x A100 40 GB, 256 GB). One rank per GPU.
    # module load PrgEnv-gnu cray-fftw cudatoolkit python pytorch   # NERSC's CUDA torch module
    # export MPICH_GPU_SUPPORT_ENABLED=0                             # host buffers only
    LAGBIAS_VENV=${LAGBIAS_VENV:-$SCRATCH/lagbias_venv_gpu}
    LAGBIAS_SRUN_CPU="--cpu-bind=cores"
    LAGBIAS_SRUN_GPU="--cpu-bind=cores --gpus-per-task=1 --gpu-bind=none"
    LAGBIAS_RUNS=${LAGBIAS_RUNS:-$SCRATCH/lagbias_runs}
    ;;
  *)
    echo "site_env.sh: unknown LAGBIAS_SITE=$LAGBIAS_SITE (generic, perlmutter-cpu, perlmutter-gpu)" >&2
    return 1 2>/dev/null || exit 1
    ;;
esac

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
export HDF5_USE_FILE_LOCKING=FALSE
export LAGBIAS_SRUN_CPU LAGBIAS_SRUN_GPU LAGBIAS_RUNS

if [ -f "$LAGBIAS_VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$LAGBIAS_VENV/bin/activate"
else
  echo "site_env.sh: no venv at $LAGBIAS_VENV (set LAGBIAS_VENV); using $(command -v python3)" >&2
fi
LAGBIAS_PYTHON=${LAGBIAS_PYTHON:-python}
export LAGBIAS_PYTHON
# ======================================= END OF SITE SET-UP ==========================
