# shellcheck shell=bash
# Helpers shared by the lagbias_mpi sbatch scripts (sourced after site_env.sh). Nothing site
# specific here: edit jobs/site_env.sh instead.
#
# Resubmission resumes: a run directory is fixed by the script (not by the job id), training
# checkpoints every epoch into RUN_DIR/checkpoints/member_<m>.pt, and lagbias_resume_flag adds
# --resume when one is there. With `#SBATCH --requeue` and `#SBATCH --signal=B:USR1@300`, Slurm
# signals the batch shell 300 s before the wall-time limit; the trap requeues the job, which starts
# again later in the same run directory and continues where it stopped: the requeue ends the step
# with SIGTERM, on which lagbias_mpi.train finishes the current optimiser step, writes a mid-epoch
# checkpoint and exits (lagbias_mpi/stopping.py).

lagbias_prepare_run_dir() {
  local dir=$1
  mkdir -p "$dir/logs"
  {
    echo "# job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) $(date -u +%FT%TZ)"
    echo "nodes=${SLURM_JOB_NUM_NODES:-1} ntasks=${SLURM_NTASKS:-?} nodelist=${SLURM_JOB_NODELIST:-$(hostname)}"
    echo "site=$LAGBIAS_SITE python=$(command -v "$LAGBIAS_PYTHON") OMP_NUM_THREADS=$OMP_NUM_THREADS"
  } >> "$dir/logs/jobs.txt"
}

lagbias_resume_flag() {
  local dir=$1
  if compgen -G "$dir/checkpoints/member_*.pt" > /dev/null; then
    echo "--resume"
  fi
}

_lagbias_on_usr1() {
  echo "lagbias: wall-time limit near: requeueing job ${SLURM_JOB_ID:-?} (it resumes from the last epoch checkpoint)" >&2
  LAGBIAS_REQUEUED=1
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    scontrol requeue "$SLURM_JOB_ID"
  fi
}

lagbias_requeue_on_signal() {
  trap _lagbias_on_usr1 USR1
}

# lagbias_srun --cpu|--gpu [srun options] command...: srun with the site's pinning flags, run in
# the background so that the USR1 trap fires while the step runs. Returns the step's exit code.
lagbias_srun() {
  local mode=$1 flags
  shift
  case $mode in
    --cpu) flags=$LAGBIAS_SRUN_CPU ;;
    --gpu) flags=$LAGBIAS_SRUN_GPU ;;
    *) echo "lagbias_srun: first argument must be --cpu or --gpu" >&2; return 2 ;;
  esac
  echo "lagbias: srun $flags $*" >&2
  # shellcheck disable=SC2086
  srun $flags "$@" &
  local pid=$! rc=0
  while :; do
    wait "$pid" && rc=0 || rc=$?
    if [ -n "${LAGBIAS_REQUEUED:-}" ]; then
      wait "$pid" 2>/dev/null || true
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
  done
  return "$rc"
}
