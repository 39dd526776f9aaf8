#!/bin/sh
# Runs every test suite and prints the total as its last line: "N passed, N failed".
# Each suite prints its own "N passed, N failed" line, which is summed here.
# In CI (CI=true) a missing PyTorch is a failure, elsewhere it is skipped with a note.
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-/usr/bin/python3}
# The test binaries include ddpm.c without its main, so they lack the start that sets
# ./ddpm's OpenMP wait (ddpm.c section 18); they get it here. With libgomp's default spin,
# the unit suite beside one busy process ran for over 27 minutes before it was stopped;
# with this, under a minute (tests/test_first_hour.py checks ./ddpm's own start).
export GOMP_SPINCOUNT=${GOMP_SPINCOUNT:-1000}
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
    t0=$(date +%s)
    "$@" > tests/out/$name.log 2>&1
    status=$?
    cat tests/out/$name.log
    echo "($name: $(( $(date +%s) - t0 )) s)"   # CI's 30 minutes are shared among the suites
    count tests/out/$name.log $status
}

suite unit tests/test_ddpm
# The same tests on the reference build (-DDDPM_PLAIN, section 16's layers only).
suite unit-plain tests/test_ddpm_plain

# The unit tests again on every other kernel variant of ddpm.c's section 17.0 that this
# CPU can execute (the Makefile builds those its compilers can). x86 levels need their
# instruction sets in /proc/cpuinfo; ARM64 runs under qemu-user.
cpu_flags=" $(grep -m 1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
missing_flag() {   # missing_flag FLAG...: print the first flag the CPU lacks
    for f in "$@"; do
        case "$cpu_flags" in *" $f "*) ;; *) echo "$f"; return ;; esac
    done
}
variant() {   # variant NAME FLAG...: run tests/test_ddpm_NAME if it was built and the CPU has FLAGs
    name=$1; shift
    if [ ! -x tests/test_ddpm_$name ]; then
        echo "NOTE skipped unit-$name: not built (the compiler cannot target it)"; return
    fi
    lack=$(missing_flag "$@")
    if [ -n "$lack" ]; then echo "NOTE skipped unit-$name: no $lack"; return; fi
    suite unit-$name tests/test_ddpm_$name
}
variant v2 ssse3 sse4_1 sse4_2 popcnt cx16
variant v3 avx avx2 fma bmi1 bmi2 f16c movbe
variant v4 avx512f avx512bw avx512cd avx512dq avx512vl
variant novec
qemu=$(command -v qemu-aarch64-static || command -v qemu-aarch64)
if [ -x tests/test_ddpm_arm64 ] && [ -n "$qemu" ]; then
    suite unit-arm64 "$qemu" -L /usr/aarch64-linux-gnu tests/test_ddpm_arm64
elif [ "$CI" = "true" ]; then
    echo "== unit-arm64: FAILED: needs gcc-aarch64-linux-gnu and qemu-user-static (see .ci/run)"
    total_fail=$((total_fail + 1))
else
    echo "NOTE skipped unit-arm64: needs gcc-aarch64-linux-gnu and qemu-user-static (apt-get install them to run it)"
fi

if $PYTHON -c 'import torch' 2>/dev/null; then
    t_dump=$(date +%s)
    tests/dump_ref tiny 2 tests/out/ref_tiny.bin >/dev/null &&
    tests/dump_ref paper 2 tests/out/ref_paper.bin >/dev/null &&
    tests/dump_ref tiny+m2 2 tests/out/ref_tiny_m2.bin >/dev/null &&   # a first channel multiplier of 2
    tests/dump_ref tiny@64 2 tests/out/ref_tiny64.bin >/dev/null &&   # 64x64, four levels (a folder at --img 64)
    tests/dump_ref paper256/16 1 tests/out/ref_paper256w16.bin >/dev/null &&   # paper256's six levels at 256x256, ch 16
    tests/dump_ref --dpm 3 tests/out/ref_dpm3.bin >/dev/null &&   # DPM-Solver++(2M)'s chain, step by step in float64
    tests/dump_ref --dpm 12 tests/out/ref_dpm12.bin >/dev/null
    echo "(dump_ref, the files the pytorch suite reads: $(( $(date +%s) - t_dump )) s)"
    suite pytorch $PYTHON tests/reference.py tests/out/ref_tiny.bin tests/out/ref_paper.bin tests/out/ref_tiny_m2.bin \
        tests/out/ref_tiny64.bin tests/out/ref_paper256w16.bin tests/out/ref_dpm3.bin tests/out/ref_dpm12.bin
    rm -f tests/out/ref_paper.bin tests/out/ref_paper256w16.bin
    # Table 2's objectives (ddpm.c sections 3-5): the true bound with a learned Sigma, and
    # the squared error on mu_tilde, through the whole network
    tests/dump_ref tiny 2 tests/out/ref_tiny_kl.bin eps,learned,kl >/dev/null &&
    tests/dump_ref tiny 2 tests/out/ref_tiny_mu.bin mu,fixedlarge,mse >/dev/null
    suite pytorch-objectives $PYTHON tests/reference.py tests/out/ref_tiny_kl.bin tests/out/ref_tiny_mu.bin
    # the reference layers of the -DDDPM_PLAIN build against PyTorch too
    tests/dump_ref_plain tiny 2 tests/out/ref_tiny_plain.bin >/dev/null &&
    tests/dump_ref_plain paper 2 tests/out/ref_paper_plain.bin >/dev/null
    suite pytorch-plain $PYTHON tests/reference.py tests/out/ref_tiny_plain.bin tests/out/ref_paper_plain.bin
    rm -f tests/out/ref_paper_plain.bin
elif [ "$CI" = "true" ]; then
    echo "== pytorch: FAILED: $PYTHON cannot import torch (apt-get install python3-torch)"
    total_fail=$((total_fail + 1))
else
    echo "== pytorch: skipped: $PYTHON cannot import torch (apt-get install python3-torch to run it)"
fi

# The loaders under libFuzzer (make fuzz: FUZZ_SECONDS each, 16 by default), seeded from
# tests/fuzz/, whose crash_* files are inputs that once crashed them.
fuzz_suite() {
    if make -s fuzz; then echo "6 passed, 0 failed"; else echo "0 passed, 1 failed"; return 1; fi
}
if make -s fuzz-build >/dev/null 2>&1; then
    suite fuzz fuzz_suite
elif [ "$CI" = "true" ]; then
    echo "== fuzz: FAILED: cannot build the libFuzzer harnesses (apt-get install clang libclang-rt-14-dev)"
    total_fail=$((total_fail + 1))
else
    echo "NOTE skipped fuzz: no clang with libFuzzer (apt-get install clang libclang-rt-14-dev to run it)"
fi

# The README's gdb walkthrough (on ./ddpm_debug, the reference build at -O0 -g).
if command -v gdb >/dev/null 2>&1; then
    suite gdb $PYTHON tests/test_gdb.py
elif [ "$CI" = "true" ]; then
    echo "== gdb: FAILED: gdb is not installed (see .ci/run)"
    total_fail=$((total_fail + 1))
else
    echo "NOTE skipped gdb: gdb is not installed (apt-get install gdb to run the README's walkthrough)"
fi

suite exercise $PYTHON tests/exercise.py selftest   # the course kit's grader (make exercise-check)

requires() {   # requires NAME CHECK HINT: true if the shell command CHECK succeeds; else a
    # failure in CI, a NOTE elsewhere, naming what to install
    sh -c "$2" >/dev/null 2>&1 && return 0
    if [ "$CI" = "true" ]; then
        echo "== $1: FAILED: $3"
        total_fail=$((total_fail + 1))
    else
        echo "NOTE skipped $1: $3"
    fi
    return 1
}

# The sample-quality score's formulas (tests/fid_fmnist.py; its classifier is not trained here).
requires fid-fmnist "$PYTHON -c 'import numpy'" "$PYTHON cannot import numpy (apt-get install python3-numpy)" &&
    suite fid-fmnist $PYTHON tests/fid_fmnist.py selftest

# The PyTorch trainer of the C-against-PyTorch comparison (README): it resumes bit for bit,
# and ./ddpm imports what it writes.
requires train-torch "$PYTHON -c 'import torch'" "$PYTHON cannot import torch (apt-get install python3-torch)" &&
    suite train-torch $PYTHON tests/train_torch.py --selftest

# The paper's own weights (data/convert_official.py), on a file built here in the layout
# diffusers publishes them in: ddpm.c's eps_theta from the converted checkpoint is the
# PyTorch model's; broken files are refused.
requires official-weights "$PYTHON -c 'import torch, numpy'" "$PYTHON cannot import torch and numpy (apt-get install python3-torch python3-numpy)" &&
    suite official-weights $PYTHON tests/test_official.py

# Every notebook, executed on a small budget (DDPM_NOTEBOOK_QUICK=1: a toy network, a few
# steps and images) into tests/out/notebooks, so that a notebook that breaks fails here.
# The committed notebooks keep the outputs of their real runs.
notebooks_suite() {   # its variables are nb_*: suite() keeps $name and $status
    nb_out=$PWD/tests/out/notebooks
    rm -rf "$nb_out" && mkdir -p "$nb_out" || return 1
    nb_pass=0; nb_fail=0
    for nb in notebooks/*.ipynb; do
        nb_base=$(basename "$nb" .ipynb)
        if DDPM_NOTEBOOK_QUICK=1 DDPM_RUN="$nb_out/run" DDPM_TABLE2="$nb_out/table2" DDPM_THREADS=${DDPM_THREADS:-1} \
           $PYTHON -m nbconvert --to notebook --execute --ExecutePreprocessor.timeout=900 \
           --output-dir "$nb_out" "$nb" > "$nb_out/$nb_base.log" 2>&1; then
            echo "PASS $nb runs (DDPM_NOTEBOOK_QUICK=1)"; nb_pass=$((nb_pass + 1))
        else
            echo "FAIL $nb: $(grep -E 'Error|error' "$nb_out/$nb_base.log" | tail -n 3)"; nb_fail=$((nb_fail + 1))
        fi
    done
    echo "$nb_pass passed, $nb_fail failed"
    [ $nb_fail -eq 0 ]
}
requires notebooks "$PYTHON -c 'import nbconvert, ipykernel, matplotlib'" \
    "apt-get install jupyter-nbconvert python3-ipykernel python3-matplotlib (see .ci/run)" &&
    suite notebooks notebooks_suite

# Data-parallel training over MPI (make mpi, ddpm.c section 23): 1 rank = ./ddpm bit for
# bit, 2 ranks within a stated tolerance, resume across rank counts, refusals, a killed rank.
mpi_suite() { make -s ddpm_mpi >/dev/null 2>&1 || { echo "make ddpm_mpi failed"; return 1; }; sh tests/test_mpi.sh; }
requires mpi "command -v mpirun && command -v mpicc" "apt-get install libopenmpi-dev openmpi-bin (see .ci/run)" &&
    suite mpi mpi_suite

suite e2e sh tests/test_e2e.sh

# A folder of pictures (ddpm.c section 19.1): every format against PIL, the cache, bad
# pictures, each network size, evaluation on a folder, and --accumulate.
requires folder "$PYTHON -c 'import numpy, PIL'" "$PYTHON cannot import numpy and PIL (apt-get install python3-numpy python3-pil)" &&
    suite folder $PYTHON tests/test_folder.py

# The first hour of a run (ddpm.c section 22): the plan line, the previews and the film,
# which leave the run's bits alone, and CIFAR-10's loader on the real subset where it exists.
requires first-hour "$PYTHON -c 'import numpy, PIL'" "$PYTHON cannot import numpy and PIL (apt-get install python3-numpy python3-pil)" &&
    suite first-hour $PYTHON tests/test_first_hour.py

# The paper's 256x256 network (the paper256 preset): its count, plan and refusals, and at a
# reduced width: training on a folder, sample, reconstruct, interpolate.
requires paper256 "$PYTHON -c 'import numpy, PIL'" "$PYTHON cannot import numpy and PIL (apt-get install python3-numpy python3-pil)" &&
    suite paper256 $PYTHON tests/test_paper256.py

echo
echo "$total_pass passed, $total_fail failed"
[ $total_fail -eq 0 ]
