#!/bin/sh
# Run a command under mpirun: rank 0 prints as usual, other ranks log to a temporary file that is
# shown only when that rank fails. The exit code is the command's.
r=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-0}}
if [ "$r" = 0 ]; then exec "$@"; fi
log=$(mktemp "${TMPDIR:-/tmp}/lagbias_pytest_rank$r.XXXXXX")
"$@" > "$log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then echo "=== rank $r failed (exit $rc), last lines of its output:"; tail -n 80 "$log"; fi
rm -f "$log"
exit $rc
