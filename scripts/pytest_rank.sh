#!/bin/sh
# Run a command under mpirun: rank 0 prints as usual, other ranks log to a temporary file whose last
# lines are shown when that rank fails, or when it is ended by a signal (mpirun ending a job after a
# failure or a timeout elsewhere): a hung rank's output is never hidden. The real stderr is passed to
# the command in file descriptor 3 (LAGBIAS_PYTEST_REPORT_FD) so that tests/conftest.py can report a
# failure at once. The exit code is the command's.
r=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-0}}
if [ "$r" = 0 ]; then exec "$@"; fi
log=$(mktemp "${TMPDIR:-/tmp}/lagbias_pytest_rank$r.XXXXXX")
exec 3>&2
export LAGBIAS_PYTEST_REPORT_FD=3
show() {
    echo "=== rank $r $1, last lines of its output:" >&3
    tail -n 80 "$log" >&3
    echo "=== rank $r: end of its output" >&3
}
child=
on_signal() {
    show "ended by signal $1"
    [ -n "$child" ] && kill -"$1" "$child" 2>/dev/null
    rm -f "$log"
    exit $((128 + $2))
}
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT
trap 'on_signal HUP 1' HUP
"$@" > "$log" 2>&1 &
child=$!
wait "$child"
rc=$?
if [ $rc -ne 0 ]; then show "failed (exit $rc)"; fi
rm -f "$log"
exit $rc
