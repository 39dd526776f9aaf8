#!/bin/sh
# Runs every test suite and prints the total as its last line: "N passed, N failed".
# Each suite prints its own "N passed, N failed" line, which is summed here.
# In CI (CI=true) a missing PyTorch is a failure, elsewhere it is skipped with a note.
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-/usr/bin/python3}
mkdir -p tests/out
total_pass=0
total_fail=0
count() {   # count LOGFILE STATUS: add the suite's closing line to the totals
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n 1)
    if [ -z "$line" ]; then
        echo "run.sh: $1 printed no summary line (exit $2): counted as 1 failure"
        total_fail=$((total_fail + 1))
        return
    fi
    p=$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')
    [ "$2" -ne 0 ] && [ "$f" -eq 0 ] && f=1
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
}
suite() {   # suite NAME COMMAND...: run one suite, show its output, count it
    name=$1; shift
    echo "== $name"
    "$@" > tests/out/$name.log 2>&1
    status=$?
    cat tests/out/$name.log
    count tests/out/$name.log $status
}

suite unit tests/test_ddpm

if $PYTHON -c 'import torch' 2>/dev/null; then
    tests/dump_ref tiny 2 tests/out/ref_tiny.bin >/dev/null &&
    tests/dump_ref paper 2 tests/out/ref_paper.bin >/dev/null
    suite pytorch $PYTHON tests/reference.py tests/out/ref_tiny.bin tests/out/ref_paper.bin
    rm -f tests/out/ref_paper.bin
elif [ "$CI" = "true" ]; then
    echo "== pytorch: FAILED: $PYTHON cannot import torch (apt-get install python3-torch)"
    total_fail=$((total_fail + 1))
else
    echo "== pytorch: skipped: $PYTHON cannot import torch (apt-get install python3-torch to run it)"
fi

suite e2e sh tests/test_e2e.sh

echo
echo "$total_pass passed, $total_fail failed"
[ $total_fail -eq 0 ]
