#!/bin/sh
# End-to-end tests of ./ddpm through its command line: training really learns, resume
# is bit-exact, runs are deterministic across thread counts, Ctrl-C/SIGTERM saves,
# checkpoints are checked, failed writes and non-finite losses leave the last good
# checkpoint intact, bad flags are refused with one line, and the small commands work.
#
#   sh tests/test_e2e.sh        (from the repository root, after `make ddpm`)
#
# Prints one line per check, "PASS name" or "FAIL name: detail", then
# "N passed, N failed"; exits 1 if any check failed. Works in tests/out/e2e/run.PID,
# removed on success. Needs /usr/bin/python3 (numpy optional) to write the synthetic
# datasets and to read .npy files and checkpoints. Most runs use --threads 1: on a 2-core machine that is
# busy with something else, OpenMP's spinning threads can make a 2-thread run of this
# tiny network many times slower; the determinism checks use 1, 2 and the default.
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-/usr/bin/python3}
# Each run works in its own folder, so two runs at once (make test while editing) do not
# delete each other's files; everything else under tests/out/e2e is removed first.
for d in tests/out/e2e/*; do
    case ${d##*/} in run.*) kill -0 "${d##*.}" 2>/dev/null && continue ;; esac
    rm -rf "$d"
done
T=tests/out/e2e/run.$$
rm -rf "$T"
mkdir -p "$T" || exit 1
start=$(date +%s)

pass=0
fail=0
# check NAME STATUS DETAIL: STATUS is a condition's exit status (0 = pass)
check() {
    if [ "$2" -eq 0 ]; then
        echo "PASS $1"
        pass=$((pass + 1))
    else
        echo "FAIL $1: $3"
        fail=$((fail + 1))
    fi
}
finish() {
    echo "($(( $(date +%s) - start )) s$([ "$fail" -ne 0 ] && echo ", files kept in $T"))"
    echo "$pass passed, $fail failed"
    if [ "$fail" -eq 0 ]; then rm -rf "$T"; rmdir tests/out/e2e 2>/dev/null; exit 0; fi
    exit 1
}

DDPM=${DDPM:-./ddpm}   # another build (ddpm_debug, a patched copy) can be tested with DDPM=path
if [ ! -x "$DDPM" ]; then
    check binary 1 "$DDPM not found: run make ddpm first"
    finish
fi

# Every command gets a time limit, so a hang is a failure rather than a stuck CI job.
if command -v timeout >/dev/null 2>&1; then TO="timeout $((240 * ${E2E_SLOW:-1}))"; else TO=""; fi

# ddp NAME ARGS...: run ./ddpm, stdout to $T/NAME.out, stderr to $T/NAME.err, status in $rc
ddp() {
    ddp_name=$1; shift
    $TO "$DDPM" "$@" >"$T/$ddp_name.out" 2>"$T/$ddp_name.err"
    rc=$?
}
nap() { sleep 0.1 2>/dev/null || sleep 1; }
lines() { wc -l <"$1" | tr -d ' '; }
one_line() { [ "$(lines "$1")" -eq 1 ]; }
# one_error FILE: a training run's stderr (progress lines first) ends in its only "ddpm: " line
one_error() { [ "$(grep -c '^ddpm: ' "$1")" -eq 1 ] && tail -n 1 "$1" | grep -q '^ddpm: '; }
err_of() { tr '\n' '|' <"$T/$1.err" | cut -c1-300; }
# last_step CSV: the step column of a log's last row
last_step() { tail -n 1 "$1" | cut -d, -f1; }

# ---- helpers in Python (standard library only): tests/e2e_tool.py ----
tool() { "$PY" tests/e2e_tool.py "$@"; }

D=$T/data
tool mkdata "$D"
check dataset $? "could not write the synthetic CIFAR-10 files with $PY"
# A small network: 45k parameters, ~40 ms per batch-4 step on one core.
NET="--ch 8 --ch-mult 1,2 --num-res-blocks 1 --attn 16 --groups 4"

# ---------------------------------------------------------------------------
# 1. Smoke: schedule, params, help
ddp schedule schedule
f=$T/schedule.out
[ $rc -eq 0 ] && [ "$(lines "$f")" -eq 1001 ]
check "schedule: exit 0, 1001 lines" $? "exit $rc, $(lines "$f") lines"
[ "$(head -n 1 "$f")" = "t,beta,alpha_bar,beta_tilde,log_beta_tilde_clipped,posterior_mean_coef1,posterior_mean_coef2" ]
check "schedule: header" $? "header is '$(head -n 1 "$f")'"
[ "$(sed -n 2p "$f" | cut -d, -f1,2)" = "1,0.0001" ] && [ "$(tail -n 1 "$f" | cut -d, -f1,2)" = "1000,0.02" ]
check "schedule: beta_1 = 0.0001, beta_1000 = 0.02" $? "rows: '$(sed -n 2p "$f")' ... '$(tail -n 1 "$f")'"
ddp params params --model paper
grep -Eq '^total +35746307$' "$T/params.out"
check "params: paper model has 35746307 parameters" $? "exit $rc, $(grep '^total' "$T/params.out")"
ddp help --help
[ $rc -eq 0 ] && grep -q '^usage:' "$T/help.out"
check "--help: exit 0, prints usage" $? "exit $rc"

# ---------------------------------------------------------------------------
# 2. Overfit a fixed set of 4 images.
#
# At initialisation eps_theta is ~0 (the output conv starts at scale 1e-10), so L_simple =
# mean(eps^2) over 4 x 3072 normals: 1 with a standard deviation of sqrt(2 / 12288) =
# 0.013. A network whose weights do not move stays at 1 (the --lr 0 control below
# measures a ratio of 1.00), so a drop of the last-50-step mean to below half of the
# first-10-step mean is tens of standard deviations from chance. Half is also above the
# 0.24 that a predictor eps = c_t x_t with the best scale per t would reach on these
# images (1 - mean_t (1 - abar_t) / (abar_t E[x_0^2] + 1 - abar_t), E[x_0^2] = 0.67),
# so the check asks that the net learned, not that it memorised. Measured: first-10 mean
# 0.96, last-50 mean 0.13, ratio 0.13: the threshold 0.5 has a margin of almost 4x.
# 300 steps take ~12 s on one core.
OVF="--data-dir $D $NET --batch 4 --no-flip --warmup 0 --sample-every 100000 --sample-n 0 --dropout 0 --threads 1"
# ratio LOG: mean loss of the last 50 rows / mean of the first 10
ratio() {
    awk -F, 'NR > 1 { n++; l[n] = $2 } END {
        if (n < 60) { print "nan"; exit }
        for (i = 1; i <= 10; i++) a += l[i]
        for (i = n - 49; i <= n; i++) b += l[i]
        printf "%.4f %.4f %.4f\n", a / 10, b / 50, (b / 50) / (a / 10) }' "$1"
}
ddp overfit $OVF --steps 300 --lr 1e-3 --run "$T/of"
[ $rc -eq 0 ] && [ "$(lines "$T/of/log.csv")" -eq 301 ] && [ "$(head -n 1 "$T/of/log.csv")" = "step,loss,lr,grad_norm,images_per_s" ]
check "overfit: 300 steps, log.csv has its header and 300 rows" $? "exit $rc: $(err_of overfit)"
r=$(ratio "$T/of/log.csv")
echo "$r" | awk '{ exit !($3 < 0.5) }'
check "overfit: last-50 mean loss < 0.5 x first-10 mean" $? "first-10, last-50, ratio: $r"
ddp overfit0 $OVF --steps 60 --lr 0 --run "$T/of0"
r0=$(ratio "$T/of0/log.csv")
[ $rc -eq 0 ] && echo "$r0" | awk '{ exit !($3 > 0.9 && $3 < 1.1) }'
check "overfit control: with --lr 0 the ratio stays ~1" $? "exit $rc, first-10, last-50, ratio: $r0"

# ---------------------------------------------------------------------------
# 3. Bit-exact resume, determinism, plain progress lines.
# Dropout (the preset's 0.1) and flips are on, so every random draw is exercised; the
# warmup (15 steps) crosses the resume point; checkpoints are also saved at steps 7, 14.
RUN="--data-dir $D $NET --batch 4 --lr 1e-3 --warmup 15 --sample-every 7 --sample-n 0 --log-every 5"
ddp A $RUN --steps 20 --run "$T/A" --threads 1
check "train A: 20 steps, exit 0" $rc "exit $rc: $(err_of A)"
ddp B1 $RUN --steps 10 --run "$T/B" --threads 1
ddp B2 $RUN --steps 20 --run "$T/B" --threads 1 --resume
[ $rc -eq 0 ] && grep -q "resumed .*model.ckpt at step 10$" "$T/B2.err"
check "train B: 10 steps, then --resume says 'resumed ... at step 10'" $? "exit $rc: $(err_of B2)"
cmp -s "$T/A/model.ckpt" "$T/B/model.ckpt"
check "resume: 20 steps == 10 + resume + 10, byte for byte" $? "$(cmp "$T/A/model.ckpt" "$T/B/model.ckpt" 2>&1)"
cut -d, -f1-4 "$T/A/log.csv" >"$T/A.log4"
cut -d, -f1-4 "$T/B/log.csv" >"$T/B.log4"
cmp -s "$T/A.log4" "$T/B.log4"
check "resume: log.csv rows (step, loss, lr, grad_norm) identical" $? "$(diff "$T/A.log4" "$T/B.log4" | head -n 4 | tr '\n' '|')"
ddp seed2 $RUN --steps 20 --run "$T/seed2" --seed 2 --threads 1
[ $rc -eq 0 ] && ! cmp -s "$T/A/model.ckpt" "$T/seed2/model.ckpt"
check "control: --seed 2 gives a different checkpoint" $? "exit $rc, or identical to seed 1"
ddp C $RUN --steps 20 --run "$T/C" --threads 1
cmp -s "$T/A/model.ckpt" "$T/C/model.ckpt"
check "determinism: same seed and flags twice, identical checkpoints" $? "exit $rc; $(cmp "$T/A/model.ckpt" "$T/C/model.ckpt" 2>&1)"
# The code promises the same bits for any number of threads (section 17.1's matmul, the
# per-image loops). Step 1's loss cannot show a difference (eps_theta ~ 0 at init), but
# its grad_norm and every later loss do.
ddp T2 $RUN --steps 20 --run "$T/T2" --threads 2
ddp T2b $RUN --steps 20 --run "$T/T2b" --threads 2
ddp Td $RUN --steps 20 --run "$T/Td"
cmp -s "$T/T2/model.ckpt" "$T/T2b/model.ckpt"
check "determinism: --threads 2 twice, identical checkpoints" $? \
    "$(cmp "$T/T2/model.ckpt" "$T/T2b/model.ckpt" 2>&1); step 1 grad_norm $(sed -n 2p "$T/T2/log.csv" | cut -d, -f4) vs $(sed -n 2p "$T/T2b/log.csv" | cut -d, -f4)"
cmp -s "$T/A/model.ckpt" "$T/T2/model.ckpt"
check "determinism: --threads 2 gives the checkpoint of --threads 1" $? \
    "$(cmp "$T/A/model.ckpt" "$T/T2/model.ckpt" 2>&1); step 1 grad_norm $(sed -n 2p "$T/A/log.csv" | cut -d, -f4) vs $(sed -n 2p "$T/T2/log.csv" | cut -d, -f4)"
cmp -s "$T/A/model.ckpt" "$T/Td/model.ckpt"
check "determinism: the default thread count gives the checkpoint of --threads 1" $? "$(cmp "$T/A/model.ckpt" "$T/Td/model.ckpt" 2>&1)"
# 10. stderr is not a terminal here: plain lines every --log-every steps, no \r
[ "$(grep -Ec '^step (5|10|15|20)/20 loss' "$T/A.err")" -eq 4 ] && [ "$(grep -c '^step ' "$T/A.err")" -eq 4 ] &&
    ! tr '\r' '@' <"$T/A.err" | grep -q @
check "progress: non-tty stderr has plain 'step N/20' lines at 5, 10, 15, 20" $? "$(grep '^step' "$T/A.err" | cut -c1-20 | tr '\n' '|')"
ddp done0 $RUN --steps 15 --run "$T/C" --resume --threads 1
cmp -s "$T/A/model.ckpt" "$T/C/model.ckpt" && [ $rc -eq 0 ] && grep -q "nothing to do" "$T/done0.err"
check "resume past --steps: exit 0, 'nothing to do', checkpoint untouched" $? "exit $rc: $(err_of done0)"

# ---------------------------------------------------------------------------
# 4. Ctrl-C (SIGINT) and SIGTERM: save, exit 128 + the signal (130, 143), resume from there.
# interrupt SIG NAME: start a long run in $T/NAME, send SIG after 3 steps; sets rc and n,
# the step it says it saved
interrupt() {
    : >"$T/$2.err"   # exists before the child opens it, so the loop below can read it
    "$DDPM" $RUN --steps 100000 --log-every 1 --sample-every 1000 --threads 1 --run "$T/$2" \
        >"$T/$2.out" 2>"$T/$2.err" &
    pid=$!
    i=0
    # stderr, not log.csv: the log is written through a stdio buffer, flushed at checkpoints
    while [ "$(grep -c '^step ' "$T/$2.err")" -lt 3 ] && [ $i -lt 600 ] && kill -0 $pid 2>/dev/null; do
        nap
        i=$((i + 1))
    done
    kill -"$1" $pid
    i=0   # a watchdog: a run that ignores the signal is killed after 60 s (and fails)
    while kill -0 $pid 2>/dev/null && [ $i -lt 600 ]; do nap; i=$((i + 1)); done
    kill -KILL $pid 2>/dev/null
    wait $pid
    rc=$?
    n=$(sed -n 's/^interrupted at step \([0-9]*\);.*/\1/p' "$T/$2.err")
}
interrupt INT sigint
[ $rc -eq 130 ] && [ -n "$n" ] && [ "$n" -ge 3 ] && [ -f "$T/sigint/model.ckpt" ]
check "SIGINT (Ctrl-C): exit 130, 'interrupted at step N', model.ckpt written" $? "exit $rc: $(err_of sigint)"
interrupt TERM sig
[ $rc -eq 143 ] && [ -n "$n" ] && [ "$n" -ge 3 ] && [ -f "$T/sig/model.ckpt" ]
check "SIGTERM: exit 143, 'interrupted at step N', model.ckpt written" $? "exit $rc: $(err_of sig)"
[ -z "$(find "$T/sig" -name '*.tmp')" ]
check "SIGTERM: no *.tmp left behind" $? "$(find "$T/sig" -name '*.tmp')"
[ -n "$n" ] && [ "$(last_step "$T/sig/log.csv")" = "$n" ]
check "SIGTERM: log.csv ends at the saved step" $? "saved step '$n', log ends at $(last_step "$T/sig/log.csv")"
n=${n:-0}
ddp sigres $RUN --steps $((n + 2)) --log-every 1 --sample-every 1000 --threads 1 --run "$T/sig" --resume
[ $rc -eq 0 ] && grep -q "resumed .*model.ckpt at step $n$" "$T/sigres.err" &&
    grep -q "^step $((n + 2))/$((n + 2)) " "$T/sigres.err" && [ "$(last_step "$T/sig/log.csv")" = "$((n + 2))" ]
check "SIGTERM: --resume continues from step $n to $((n + 2))" $? "exit $rc: $(err_of sigres)"
[ "$(cut -d, -f1 "$T/sig/log.csv" | tail -n +2 | awk '$1 != NR { bad = 1 } END { print NR, bad + 0 }')" = "$((n + 2)) 0" ]
check "SIGTERM: log.csv steps run 1, 2, ..., $((n + 2)) once each" $? "$(cut -d, -f1 "$T/sig/log.csv" | tr '\n' ' ')"

# ---------------------------------------------------------------------------
# 5. Sampling from a good checkpoint, and refusing bad ones.
GOOD=$T/of/model.ckpt
tool checksum "$GOOD"
check "checkpoint: size and trailing FNV-1a checksum as documented in ddpm.c section 20" $? "python's FNV-1a 64 disagrees"
# One run: the grid beside the checkpoint, and with --trace the chain's x_t and x0_hat.
ddp sample sample --checkpoint "$GOOD" -n 2 --trace --threads 1
[ $rc -eq 0 ] && [ "$(head -c 4 "$T/of/samples.png" | od -An -c | tr -d ' ')" = "211PNG" ]
check "sample: -n 2 writes samples.png beside the checkpoint, exit 0" $? "exit $rc: $(err_of sample)"
ok=0
for s in x_t.npy x0_hat.npy t.npy x_t.png x0_hat.png; do [ -s "$T/of/samples_trace_$s" ] || ok=1; done
[ $rc -eq 0 ] && [ $ok -eq 0 ]
check "sample --trace: samples_trace_{x_t,x0_hat,t}.npy and two PNGs" $? "exit $rc: $(ls "$T/of" | tr '\n' ' ')"
out=$(tool npy "$T/of/samples_trace_x_t.npy" 11,2,3,32,32 2>&1 && tool npy "$T/of/samples_trace_x0_hat.npy" 11,2,3,32,32 2>&1 &&
      tool npy "$T/of/samples_trace_t.npy" 11 2>&1 && tool trace_t "$T/of/samples_trace_t.npy" 2>&1)
check "sample --trace: .npy files load, shapes (11 steps, 2 images, 3, 32, 32), t = 1000 ... 1" $? "$(echo "$out" | tail -n 2 | tr '\n' '|')"

# corrupt CASE FILE: sampling from FILE fails with exit 1 and one stderr line naming FILE
corrupt() {
    ddp "bad_$1" sample --checkpoint "$2" -n 1 --out "$T/never.png"
    [ $rc -eq 1 ] && one_line "$T/bad_$1.err" && grep -qF "$2" "$T/bad_$1.err"
    check "corrupt checkpoint ($1): exit 1, one line naming the file" $? "exit $rc: $(err_of "bad_$1")"
}
size=$(wc -c <"$GOOD" | tr -d ' ')
head -c 100000 "$GOOD" >"$T/trunc.ckpt"; corrupt truncated "$T/trunc.ckpt"
head -c $((size - 8)) "$GOOD" >"$T/nosum.ckpt"; corrupt "no checksum" "$T/nosum.ckpt"
cp "$GOOD" "$T/flip.ckpt"; tool xor "$T/flip.ckpt" mid 0x10; corrupt "byte flipped mid-file" "$T/flip.ckpt"
cp "$GOOD" "$T/step.ckpt"; tool xor "$T/step.ckpt" 112 0x01; corrupt "header step field flipped" "$T/step.ckpt"
# The header's --ch field (bytes 24..27) with its top byte flipped: ch = 8 + 2^24.
cp "$GOOD" "$T/ch.ckpt"; tool xor "$T/ch.ckpt" 27 0x01; corrupt "header ch field flipped" "$T/ch.ckpt"
# The header's num_res_blocks field (bytes 56..59) with a high bit flipped.
cp "$GOOD" "$T/nrb.ckpt"; tool xor "$T/nrb.ckpt" 58 0x01; corrupt "header num_res_blocks flipped" "$T/nrb.ckpt"
corrupt "a PNG" "$T/of/samples.png"
head -c 1000 /dev/urandom >"$T/random.ckpt"; corrupt "1000 random bytes" "$T/random.ckpt"
: >"$T/empty.ckpt"; corrupt "empty file" "$T/empty.ckpt"
corrupt "missing path" "$T/no/such.ckpt"
corrupt "a directory" "$T/of"

# Training's checkpoint rules.
ddp exists $OVF --steps 310 --lr 1e-3 --run "$T/of"
[ $rc -eq 2 ] && one_line "$T/exists.err" && grep -q -- "--resume" "$T/exists.err"
check "train over an existing checkpoint without --resume: exit 2, one line" $? "exit $rc: $(err_of exists)"
ddp noresume $OVF --steps 10 --lr 1e-3 --run "$T/nothing" --resume
[ $rc -eq 2 ] && one_line "$T/noresume.err"
check "--resume without a checkpoint: exit 2, one line" $? "exit $rc: $(err_of noresume)"
cp "$GOOD" "$T/of.bak"
ddp otherch $OVF --steps 310 --lr 1e-3 --run "$T/of" --resume --ch 16
[ $rc -ne 0 ] && [ $rc -lt 128 ] && one_line "$T/otherch.err" && grep -qF "$GOOD" "$T/otherch.err"
check "--resume with another --ch: refused, one line naming the checkpoint" $? "exit $rc: $(err_of otherch)"
ddp othermodel --data-dir $D --model small --batch 4 --steps 310 --run "$T/of" --resume --threads 1
[ $rc -ne 0 ] && [ $rc -lt 128 ] && one_line "$T/othermodel.err"
check "--resume with another --model: refused, one line" $? "exit $rc: $(err_of othermodel)"
ddp othersched $OVF --steps 310 --lr 1e-3 --run "$T/of" --resume --schedule cosine
[ $rc -ne 0 ] && [ $rc -lt 128 ] && one_line "$T/othersched.err"
check "--resume with another --schedule: refused, one line" $? "exit $rc: $(err_of othersched)"
ddp otherbatch $OVF --steps 310 --lr 1e-3 --run "$T/of" --resume --batch 2
[ $rc -eq 2 ] && one_line "$T/otherbatch.err" && grep -q -- "--batch 4" "$T/otherbatch.err"
check "--resume with another --batch: refused, one line naming the batch it was trained with" $? "exit $rc: $(err_of otherbatch)"
cmp -s "$GOOD" "$T/of.bak"
check "refused resumes leave the checkpoint untouched" $? "model.ckpt changed"
mkdir -p "$T/rflip" && cp "$T/flip.ckpt" "$T/rflip/model.ckpt"
ddp resflip $OVF --steps 310 --lr 1e-3 --run "$T/rflip" --resume
[ $rc -eq 1 ] && one_line "$T/resflip.err" && grep -qF "$T/rflip/model.ckpt" "$T/resflip.err"
check "--resume from a corrupt checkpoint: exit 1, one line naming it" $? "exit $rc: $(err_of resflip)"

# ---------------------------------------------------------------------------
# 6. A failed checkpoint write leaves the previous checkpoint intact.
# (a) model.ckpt.tmp is a directory, so it cannot be created (chmod does not stop root).
cp -r "$T/A" "$T/W1"
mkdir "$T/W1/model.ckpt.tmp"
ddp w1 $RUN --steps 22 --run "$T/W1" --resume --threads 1
[ $rc -eq 1 ] && one_error "$T/w1.err" && grep -qF "$T/W1/model.ckpt" "$T/w1.err"
check "unwritable model.ckpt.tmp: exit 1, one line naming the checkpoint" $? "exit $rc: $(err_of w1)"
cmp -s "$T/A/model.ckpt" "$T/W1/model.ckpt"
check "unwritable model.ckpt.tmp: previous checkpoint byte-identical" $? "model.ckpt changed"
# (b) A full disk, simulated with a file-size limit: writes past it fail with EFBIG
# (SIGXFSZ is ignored, and an ignored signal stays ignored across exec). 100 blocks of
# 512 or 1024 bytes are far below the 724 kB checkpoint.
cp -r "$T/A" "$T/W2"
( trap '' XFSZ; ulimit -f 100 && exec $TO "$DDPM" $RUN --steps 22 --run "$T/W2" --resume --threads 1 ) \
    >"$T/w2.out" 2>"$T/w2.err"
rc=$?
[ $rc -eq 1 ] && one_error "$T/w2.err" && grep -qF "$T/W2/model.ckpt" "$T/w2.err"
check "disk full while writing: exit 1, one line naming the checkpoint" $? "exit $rc: $(err_of w2)"
cmp -s "$T/A/model.ckpt" "$T/W2/model.ckpt" && [ -z "$(find "$T/W2" -name '*.tmp')" ]
check "disk full while writing: previous checkpoint byte-identical, no *.tmp left" $? "$(ls "$T/W2" | tr '\n' ' ')"
# Then the same command with room to write succeeds from the intact checkpoint, and the
# run's log should read like a run that never failed: steps 1..22, once each.
ddp w2b $RUN --steps 22 --run "$T/W2" --resume --threads 1
[ $rc -eq 0 ] && grep -q "at step 20$" "$T/w2b.err"
check "after the failed write, --resume continues from step 20" $? "exit $rc: $(err_of w2b)"
steps=$(tail -n +2 "$T/W2/log.csv" | cut -d, -f1 | tr '\n' ' ')
[ "$steps" = "$(awk 'BEGIN { for (i = 1; i <= 22; i++) printf "%d ", i }')" ]
check "after the failed write and a resume, log.csv has steps 1..22 once each" $? "log.csv steps: $steps"

# ---------------------------------------------------------------------------
# 7. Non-finite state is never trained on, nor saved.
# Flags cannot provoke a non-finite loss: --lr 1 (the largest accepted) with --grad-clip
# 1e9 --warmup 0 ran 200 steps with finite losses (GroupNorm bounds the activations). A
# checkpoint whose live parameters are NaN (EMA, Adam state kept, checksum re-sealed) is
# refused when it is loaded. (The guard on the loss itself, train_step's early return
# with nothing updated, is a unit test; checkpoint_save refuses non-finite weights too.)
mkdir -p "$T/nan"
tool nan "$T/A/model.ckpt" "$T/nan/model.ckpt"
cp "$T/A/log.csv" "$T/nan/log.csv"
cp "$T/nan/model.ckpt" "$T/nan.bak"
ddp nan $RUN --steps 25 --run "$T/nan" --resume --threads 1
[ $rc -eq 1 ] && one_line "$T/nan.err" && grep -q "non-finite" "$T/nan.err" && grep -qF "$T/nan/model.ckpt" "$T/nan.err"
check "NaN weights in a checkpoint: exit 1, one line naming it (non-finite)" $? "exit $rc: $(err_of nan)"
cmp -s "$T/nan/model.ckpt" "$T/nan.bak" && [ -z "$(find "$T/nan" -name '*.tmp')" ] && [ "$(last_step "$T/nan/log.csv")" = 20 ]
check "NaN weights: checkpoint and log untouched, no *.tmp" $? "log ends at $(last_step "$T/nan/log.csv")"
ddp nans sample --checkpoint "$T/nan/model.ckpt" -n 1 --out "$T/never.png" --threads 1
[ $rc -eq 0 ]
check "NaN live weights with a finite EMA: sample (which reads the EMA only) still works" $? "exit $rc: $(err_of nans)"

# ---------------------------------------------------------------------------
# 8. Bad flags: exit 2 and one line naming the problem. Each command also points at a
# missing dataset and a scratch run folder, so one that is wrongly accepted fails fast.
SAFE="--data-dir $T/nodata --run $T/badrun --steps 1"
bad() {   # bad NAME WORD ARGS...: exit 2, one stderr line containing WORD
    name=$1; word=$2; shift 2
    ddp "flag_$name" "$@"
    [ $rc -eq 2 ] && one_line "$T/flag_$name.err" && grep -qF -- "$word" "$T/flag_$name.err"
    check "bad flags ($name): exit 2, one line with '$word'" $? "exit $rc: $(err_of "flag_$name")"
}
bad "unknown flag" "--bogus" $SAFE --bogus
bad "--batch 0" "--batch" $SAFE --batch 0
bad "--batch abc" "abc" $SAFE --batch abc
bad "--model huge" "huge" $SAFE --model huge
bad "--data mnist" "mnist" $SAFE --data mnist
bad "--steps -1" "--steps" $SAFE --steps -1
bad "--ch 30 --groups 8" "--groups" $SAFE --ch 30 --groups 8
bad "--attn 3" "--attn 3" $SAFE --attn 3
bad "--lr 2" "--lr" $SAFE --lr 2
bad "--seed without value" "--seed" $SAFE --seed
bad "unknown command" "frobnicate" frobnicate $SAFE
bad "sample without --checkpoint" "--checkpoint" sample -n 1
# The option table (ddpm.c 22.1) says which commands read a flag: elsewhere it is refused
bad "--batch on sample" "--batch applies to train and import, not sample" sample --checkpoint "$T/none.ckpt" --batch 4
bad "--lr on bpd" "--lr applies to train, not bpd" bpd --checkpoint "$T/none.ckpt" --lr 0.1
bad "--t with a trailing comma" "--t 5," reconstruct --checkpoint "$T/none.ckpt" --index 0 --t 5,
bad "--index with a trailing comma" "--index 1," reconstruct --checkpoint "$T/none.ckpt" --index 1,
bad "--seed on schedule" "--seed" schedule --seed 3
ddp help_cmd help
cmp -s "$T/help_cmd.out" "$T/help.out" && [ $rc -eq 0 ]
check "./ddpm help prints what --help prints" $? "exit $rc"
# --help is printed from the table: every option of the table has its line, with its default
for f in --data --data-dir --model --batch --steps --minutes --run --resume --sample-every --first-preview --sample-n --log-every \
         --lr --warmup --grad-clip --ema-decay --no-flip --schedule --mean-type --var-type --loss --ch --ch-mult \
         --num-res-blocks --attn --groups --dropout --in-ch --checkpoint -n --sigma --sampler --eta --trace --npz \
         --per-t --t-samples --index --t -k --lambdas --out --weights --seed --threads; do
    grep -q -- "^  $f[ ]" "$T/help.out" || { echo "  --help lacks $f"; false; } || break
done
check "--help has a line for every option" $? "see above"
grep -q -- "--sample-every N  *a preview grid + checkpoint every N steps (default 2000)" "$T/help.out" &&
    grep -q -- "--ema-decay X  *the EMA's decay (section 9) (default 0.9999)" "$T/help.out" &&
    tr -s " \n" " " < "$T/help.out" | grep -q -- "(default: tiny 32, small 32, paper 128, paper256 64)"
check "--help shows the defaults the code uses (the table's, PAPER_HYPER's, the presets' runs)" $? "$(grep -- '--sample-every\|--ema-decay\|--batch' "$T/help.out" | tr '\n' '|')"
ddp nodata --data cifar10 --data-dir /nonexistent --run "$T/badrun" --steps 1
[ $rc -eq 1 ] && one_line "$T/nodata.err" && grep -qF 'make cifar10' "$T/nodata.err" &&
    grep -qF -- '--data fashion-mnist' "$T/nodata.err"
check "missing CIFAR-10: exit 1, one line pointing at make cifar10 and --data fashion-mnist" $? "exit $rc: $(err_of nodata)"
[ ! -e "$T/badrun" ]
check "refused commands create no run folder" $? "$T/badrun exists"

# ---------------------------------------------------------------------------
# 9. The variational bound, and one short run on the real (offline) Fashion-MNIST.
ddp bpd bpd --checkpoint "$GOOD" -n 2 --data-dir "$D" --threads 1
out=$(awk '
    /^  L_T /         { a = $2; n++ }
    /^  sum L_/       { b = $3; n++ }
    /^  L_0 /         { c = $2; n++ }
    /^  total /       { d = $4; n++ }
    END {
        ok = n == 4
        for (i = 0; i < 4; i++) { v = (i == 0 ? a : i == 1 ? b : i == 2 ? c : d)
            if (v !~ /^-?[0-9]+\.[0-9]+$/) ok = 0 }
        s = a + b + c; e = d - s; if (e < 0) e = -e
        if (ok && (e > 1e-5 || d <= 0)) ok = 0
        print ok, a, b, c, d }' "$T/bpd.out")
[ $rc -eq 0 ] && [ "${out%% *}" = 1 ]
check "bpd -n 2: L_T, sum L_{t-1}, L_0, total finite, total = sum of parts" $? "exit $rc, parsed: $out $(err_of bpd)"

if [ ! -f data/fashion-mnist/train-images-idx3-ubyte ]; then make fashion-mnist >/dev/null 2>&1; fi
ddp fashion --data fashion-mnist $NET --batch 4 --steps 3 --sample-every 3 --sample-n 4 --threads 1 --run "$T/fm"
[ $rc -eq 0 ] && [ "$(lines "$T/fm/log.csv")" -eq 4 ] && [ -s "$T/fm/model.ckpt" ] &&
    [ "$(head -c 4 "$T/fm/samples_0000003.png" 2>/dev/null | od -An -c | tr -d ' ')" = "211PNG" ]
check "fashion-mnist: 3 steps write log.csv, model.ckpt, samples_0000003.png" $? "exit $rc: $(err_of fashion) $(ls "$T/fm" 2>&1 | tr '\n' ' ')"

# ---------------------------------------------------------------------------
# 10. Hostile inputs: re-sealed lying headers, FIFOs, unwritable outputs, a full disk.
# The checksum only guards against accidents; a header edited and re-sealed must still be
# refused field by field, before anything is built from it. Header offsets (section 20):
# in_ch 16, img 20, ch 24, attn_res 64.., step 112.
# hostile CASE CMD...: exit 1 and exactly one stderr line
hostile() {
    hcase=$1; shift
    ddp "h_$hcase" "$@"
    [ $rc -eq 1 ] && one_line "$T/h_$hcase.err"
    check "hostile input ($hcase): exit 1, one line" $? "exit $rc: $(err_of "h_$hcase")"
}
# img 16 with the attention moved from 16x16 to 8x8: the same parameter count, a
# consistent network, but not one for the 32x32 test images (was: heap overflow in bpd)
tool reseal "$GOOD" "$T/img16.ckpt" 20 i 16 64 i 8
hostile "img 16 re-sealed, bpd" bpd --checkpoint "$T/img16.ckpt" -n 1 --data-dir "$D" --threads 1
grep -q "test set" "$T/h_img 16 re-sealed, bpd.err"
check "bpd on a network for other images names the test set" $? "$(err_of "h_img 16 re-sealed, bpd")"
tool reseal "$GOOD" "$T/inch2.ckpt" 16 i 2
hostile "in_ch 2 re-sealed, sample" sample --checkpoint "$T/inch2.ckpt" -n 1 --out "$T/never.png" --threads 1
grep -q "corrupt" "$T/h_in_ch 2 re-sealed, sample.err"
check "a header that contradicts its own size is called corrupt" $? "$(err_of "h_in_ch 2 re-sealed, sample")"
# ch 2048 claims a network of about a billion parameters in a 720 kB file: refused before
# any buffer is built, so it fits in 200 MB of address space (was: gigabytes asked for,
# then "out of memory ... try a smaller --batch" for a corrupt file)
tool reseal "$GOOD" "$T/mult.ckpt" 24 i 2048
# (AddressSanitizer reserves terabytes of address space: under make sanitize, no limit)
if [ -n "$E2E_ASAN" ]; then vlimit=unlimited; else vlimit=200000; fi
( ulimit -v $vlimit && exec $TO "$DDPM" sample --checkpoint "$T/mult.ckpt" -n 1 --out "$T/never.png" --threads 1 ) \
    >"$T/h_mult.out" 2>"$T/h_mult.err"
rc=$?
[ $rc -eq 1 ] && one_line "$T/h_mult.err" && grep -q "corrupt" "$T/h_mult.err"
check "ch 2048 re-sealed: refused as corrupt within 200 MB" $? "exit $rc: $(err_of h_mult)"
tool reseal "$GOOD" "$T/step.ckpt" 112 Q 0xffffffffffffffff
hostile "step 2^64-1 re-sealed, sample" sample --checkpoint "$T/step.ckpt" -n 1 --out "$T/never.png" --threads 1
# a FIFO as the checkpoint: refused at once instead of blocking in open
mkfifo "$T/fifo.ckpt"
hostile "a FIFO as the checkpoint" sample --checkpoint "$T/fifo.ckpt" -n 1 --out "$T/never.png" --threads 1
# outputs are checked before the 1000 sampling steps, not after
hostile "--out in a missing folder" sample --checkpoint "$GOOD" -n 1 --out "$T/no/such/dir/x.png" --threads 1
! grep -q "sampling: step" "$T/h_--out in a missing folder.err"
check "--out in a missing folder: refused before sampling" $? "$(err_of "h_--out in a missing folder")"
mkfifo "$T/fifo.png"
hostile "--out a FIFO" sample --checkpoint "$GOOD" -n 1 --out "$T/fifo.png" --threads 1
[ -p "$T/fifo.png" ]
check "--out a FIFO: the FIFO is left as it was" $? "$(ls -l "$T/fifo.png" 2>&1)"
# a full disk while writing the PNG (a file-size limit, as in 6): one line, no file left.
# stderr goes through a pipe, which the limit does not cover (a file would be cut at 1 KiB)
mkdir -p "$T/full"
( trap '' XFSZ; ulimit -f 1 && $TO "$DDPM" sample --checkpoint "$GOOD" -n 1 --out "$T/full/s.png" --threads 1 \
    2>&1 >/dev/null; echo $? >"$T/h_full.rc" ) | cat >"$T/h_full.err"
rc=$(cat "$T/h_full.rc")
[ $rc -eq 1 ] && grep -c '^ddpm: ' "$T/h_full.err" | grep -qx 1 && grep -q "$T/full/s.png" "$T/h_full.err" &&
    [ -z "$(ls "$T/full")" ]
check "disk full while writing the sample PNG: exit 1, one line naming it, no file left" $? \
    "exit $rc: $(err_of h_full) $(ls "$T/full" | tr '\n' ' ')"

# a row torn by a kill (here "1", the first digit of a row that never got its newline)
# must not survive the resume: it would be glued to the next row (was: "11,0.25..." kept)
cp -r "$T/A" "$T/torn"
printf '1' >>"$T/torn/log.csv"
ddp torn $RUN --steps 22 --run "$T/torn" --resume --threads 1
[ $rc -eq 0 ] && [ "$(tail -n +2 "$T/torn/log.csv" | cut -d, -f1 | tr '\n' ' ')" = "$(awk 'BEGIN { for (i = 1; i <= 22; i++) printf "%d ", i }')" ] &&
    [ -z "$(awk -F, 'NR > 1 && NF != 5' "$T/torn/log.csv")" ]
check "a torn last row of log.csv is dropped on resume: steps 1..22 once each, five fields each" $? \
    "exit $rc: $(tail -n 4 "$T/torn/log.csv" | tr '\n' '|')"
# a 3-channel network evaluated on the 1-channel Fashion-MNIST test set (was: exit 0, one
# channel of three filled)
ddp bpdfm bpd --checkpoint "$GOOD" -n 1 --data fashion-mnist --threads 1
[ $rc -eq 1 ] && one_line "$T/bpdfm.err" && grep -q "test set" "$T/bpdfm.err"
check "bpd of a 3-channel network with --data fashion-mnist: exit 1, one line" $? "exit $rc: $(err_of bpdfm)"
# a symlink loop is not "not found"; a depth beyond the supported range names its flag
ln -s loop.ckpt "$T/loop.ckpt"
hostile "a symlink loop as the checkpoint" sample --checkpoint "$T/loop.ckpt" -n 1 --out "$T/never.png"
! grep -q "not found" "$T/h_a symlink loop as the checkpoint.err"
check "a symlink loop is reported as such, not as a missing file" $? "$(err_of "h_a symlink loop as the checkpoint")"
ddp nrb12 params --num-res-blocks 12
[ $rc -ne 0 ] && [ $rc -lt 128 ] && one_line "$T/nrb12.err" && grep -q -- "--num-res-blocks" "$T/nrb12.err"
check "--num-res-blocks 12: refused in one line naming the flag" $? "exit $rc: $(err_of nrb12)"
# two training runs into one folder: the second is refused, naming the folder and the PID
: >"$T/lock1.err"
"$DDPM" $RUN --steps 100000 --log-every 1 --sample-every 100000 --threads 1 --run "$T/locked" >"$T/lock1.out" 2>"$T/lock1.err" &
lpid=$!
i=0
while [ "$(grep -c '^step ' "$T/lock1.err")" -lt 1 ] && [ $i -lt 600 ] && kill -0 $lpid 2>/dev/null; do nap; i=$((i + 1)); done
ddp lock2 $RUN --steps 5 --threads 1 --run "$T/locked"
kill -TERM $lpid 2>/dev/null
wait $lpid
[ $rc -eq 1 ] && one_line "$T/lock2.err" && grep -q "in use by another training run (PID $lpid)" "$T/lock2.err"
check "a second training run into the same folder: exit 1, one line naming the PID" $? "exit $rc: $(err_of lock2)"

# ---------------------------------------------------------------------------
# 11. §4.3-4.4 and fewer steps: bpd --per-t, reconstruct, interpolate, sample --steps, DDIM.
ddp s_full sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/full.png"
ddp s_k1000 sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/k1000.png" --steps 1000
[ $rc -eq 0 ] && cmp -s "$T/full.npy" "$T/k1000.npy" && cmp -s "$T/full.png" "$T/k1000.png"
check "sample --steps 1000: the same bits as Algorithm 2 (samples .npy and PNG)" $? "exit $rc: $(err_of s_k1000)"
ddp s_npz sample --checkpoint "$GOOD" -n 3 --threads 1 --out "$T/npz.png" --steps 10 --npz "$T/samples.npz"
out=$(tool npz "$T/samples.npz" "$T/npz.npy" 2>&1)
check "sample --npz: arr_0, uint8 N x H x W x C, as numpy.savez writes it" $? "exit $rc: $out $(err_of s_npz)"
bad "--npz on bpd" "--npz" bpd --checkpoint "$GOOD" --npz "$T/never.npz"
ddp npz_nowhere sample --checkpoint "$GOOD" -n 1 --npz "$T/nowhere/s.npz" --out "$T/never_npz.png"
[ $rc -eq 1 ] && one_line "$T/npz_nowhere.err" && grep -q -- "--npz" "$T/npz_nowhere.err" && [ ! -e "$T/never_npz.png" ]
check "--npz into a missing folder: refused before sampling, in one line" $? "exit $rc: $(err_of npz_nowhere)"
ddp s_k10 sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/k10.png" --steps 10 --trace
out=$(tool npy "$T/k10.npy" 2,3,32,32 2>&1 && tool npy "$T/k10_trace_x0_hat.npy" 10,2,3,32,32 2>&1 &&
      tool trace_t "$T/k10_trace_t.npy" 2>&1)
[ $rc -eq 0 ] && ! cmp -s "$T/full.npy" "$T/k10.npy"
check "sample --steps 10 --trace: 2 samples, 10 trace records t = 1000 ... 1" $? "exit $rc: $out $(err_of s_k10)"
ddp s_k10d sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/k10d.png" --steps 10 --sampler dpm++
ddp s_k10a sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/k10a.png" --steps 10 --sampler ddpm
[ $rc -eq 0 ] && cmp -s "$T/k10.npy" "$T/k10d.npy" && ! cmp -s "$T/k10.npy" "$T/k10a.npy" && grep -q "Alg. 2" "$T/s_k10a.out"
ok10=$?
ddp s_k51 sample --checkpoint "$GOOD" -n 1 --threads 1 --out "$T/k51.png" --steps 51
[ $ok10 -eq 0 ] && [ $rc -eq 0 ] && grep -q "Alg. 2" "$T/s_k51.out" && grep -q "DPM-Solver++" "$T/s_k10.out"
check "sample --steps 10: DPM-Solver++'s chain unless --sampler names another (ddpm: the strided Alg. 2); --steps 51: Alg. 2's" $? "exit $rc: $(err_of s_k10a) $(err_of s_k51)"
ddp s_ddim sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/ddim.png" --steps 20 --sampler ddim
ddp s_ddim2 sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/ddim2.png" --steps 20 --sampler ddim --eta 0
ddp s_ddim3 sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/ddim3.png" --steps 20 --sampler ddim --eta 1
[ $rc -eq 0 ] && cmp -s "$T/ddim.npy" "$T/ddim2.npy" && ! cmp -s "$T/ddim.npy" "$T/ddim3.npy" && tool npy "$T/ddim3.npy" 2,3,32,32 >/dev/null
check "sample --sampler ddim: eta 0 is the default, eta 1 differs, both finite" $? "exit $rc: $(err_of s_ddim3)"
ddp s_dpm1 sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/dpm1.png" --steps 1 --sampler dpm++
ddp s_dpm2 sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/dpm2.png" --steps 2 --sampler dpm++ --trace
out=$(tool npy "$T/dpm1.npy" 2,3,32,32 2>&1 && tool npy "$T/dpm2.npy" 2,3,32,32 2>&1 &&
      tool npy "$T/dpm2_trace_x_t.npy" 2,2,3,32,32 2>&1)
[ $rc -eq 0 ] && ! cmp -s "$T/dpm1.npy" "$T/dpm2.npy" && grep -q "1 steps, DPM-Solver++(2M)" "$T/s_dpm1.out"
check "sample --sampler dpm++ --steps 1 and --steps 2 (--trace): finite samples, two records, the two differ" $? \
      "exit $rc: $out $(err_of s_dpm2)"
ddp s_dpm20 sample --checkpoint "$GOOD" -n 2 --threads 1 --out "$T/dpm20.png" --steps 20 --sampler dpm++
ddp s_dpm20b sample --checkpoint "$GOOD" -n 2 --threads 2 --out "$T/dpm20b.png" --steps 20 --sampler dpm++
[ $rc -eq 0 ] && cmp -s "$T/dpm20.npy" "$T/dpm20b.npy" && ! cmp -s "$T/dpm20.npy" "$T/ddim.npy"
check "sample --sampler dpm++ --steps 20: the same bits on 1 and 2 threads, not DDIM's" $? "exit $rc: $(err_of s_dpm20b)"
ddp pert bpd --checkpoint "$GOOD" -n 2 --data-dir "$D" --threads 1 --per-t "$T/per_t.csv"
total=$(awk '/^  total / { print $4 }' "$T/pert.out"); prior=$(awk '/^  L_T / { print $2 }' "$T/pert.out")
out=$(tool per_t "$T/per_t.csv" "$total" "$prior" 1000 2>&1)
check "bpd --per-t: 1000 rows; terms + L_T = the printed total; rate falls in t; distortion(1) < distortion(T)" $? "exit $rc: $out $(err_of pert)"
ddp pert1000 bpd --checkpoint "$GOOD" -n 2 --data-dir "$D" --threads 1 --steps 1000
[ $rc -eq 0 ] && [ "$(grep total "$T/pert1000.out")" = "$(grep total "$T/pert.out")" ] && grep -q total "$T/pert.out"
check "bpd --steps 1000 = bpd (and --per-t does not change the bound)" $? "exit $rc: $(grep total "$T/pert1000.out" "$T/pert.out" | tr '\n' ' ')"
ddp pert50 bpd --checkpoint "$GOOD" -n 2 --data-dir "$D" --threads 1 --per-t "$T/per_t50.csv" --steps 50
total=$(awk '/^  total / { print $4 }' "$T/pert50.out"); prior=$(awk '/^  L_T / { print $2 }' "$T/pert50.out")
out=$(tool per_t "$T/per_t50.csv" "$total" "$prior" 50 2>&1)
[ $rc -eq 0 ] && grep -q "50 steps" "$T/pert50.out" && echo "$out" | grep -q "t = 1, .* t = 1000"
check "bpd --steps 50 --per-t: the bound of the 50-step chain, rows t = 1 ... 1000" $? "exit $rc: $out $(err_of pert50)"
ddp recon reconstruct --checkpoint "$GOOD" --data-dir "$D" --index 0 --t 1,1000 -k 3 --threads 1 --out "$T/recon.png"
out=$(tool npy "$T/recon.npy" 2,5,3,32,32 2>&1 && tool recon "$T/recon.npy" 3 2>&1)
[ $rc -eq 0 ] && [ "$(head -c 4 "$T/recon.png" | od -An -c | tr -d ' ')" = "211PNG" ]
check "reconstruct --t 1,1000 -k 3: a 2 x 5 grid; t = 1 within 4 levels of x_0, t = T samples differ" $? "exit $rc: $out $(err_of recon)"
ddp interp interpolate --checkpoint "$GOOD" --data-dir "$D" --index 0,3 --t 1,500 --lambdas 3 --threads 1
out=$(tool npy "$T/of/interpolate.npy" 2,5,3,32,32 2>&1 && tool npy "$T/of/interpolate_t.npy" 2 2>&1 && tool interp "$T/of/interpolate.npy" 3 2>&1)
[ $rc -eq 0 ] && [ -s "$T/of/interpolate.png" ]
check "interpolate --index 0,3 --t 1,500: beside the checkpoint; at t = 1 the ends decode to A and B" $? "exit $rc: $out $(err_of interp)"
bad "sample --steps 0" "--steps" sample --checkpoint "$GOOD" --steps 0 --out "$T/never11.png"
bad "sample --steps 1001" "--steps" sample --checkpoint "$GOOD" --steps 1001 --out "$T/never11.png"
bad "--eta 2" "--eta" sample --checkpoint "$GOOD" --sampler ddim --eta 2 --out "$T/never11.png"
bad "--eta without ddim" "--eta" sample --checkpoint "$GOOD" --eta 0.5 --out "$T/never11.png"
bad "--eta with dpm++" "--eta" sample --checkpoint "$GOOD" --sampler dpm++ --eta 0.5 --out "$T/never11.png"
bad "--sigma with dpm++" "--sigma" sample --checkpoint "$GOOD" --sampler dpm++ --sigma beta_tilde --out "$T/never11.png"
bad "--sampler ddim on bpd" "--sampler" bpd --checkpoint "$GOOD" --sampler ddim
bad "--index past the test set" "--index 4" reconstruct --checkpoint "$GOOD" --data-dir "$D" --index 4 --out "$T/never11.png"
bad "--index -1" "--index" reconstruct --checkpoint "$GOOD" --data-dir "$D" --index -1 --out "$T/never11.png"
bad "--t 0" "--t" reconstruct --checkpoint "$GOOD" --data-dir "$D" --index 0 --t 0 --out "$T/never11.png"
bad "--t 1001" "--t 1001" interpolate --checkpoint "$GOOD" --data-dir "$D" --index 0,1 --t 1001 --out "$T/never11.png"
bad "interpolate with one --index" "--index" interpolate --checkpoint "$GOOD" --data-dir "$D" --index 0 --out "$T/never11.png"
bad "--lambdas 1" "--lambdas" interpolate --checkpoint "$GOOD" --data-dir "$D" --index 0,1 --lambdas 1
bad "--steps on reconstruct" "--steps" reconstruct --checkpoint "$GOOD" --data-dir "$D" --index 0 --steps 10
[ ! -e "$T/never11.png" ]
check "refused sampling commands write nothing" $? "$T/never11.png exists"

# ---------------------------------------------------------------------------
# 12. Table 2's objectives: each trains, and its checkpoint samples and evaluates with no
# flag repeated; flags that contradict a checkpoint, and combinations that cannot train,
# are refused in one line.
OBJ="--data-dir $D $NET --batch 2 --steps 3 --sample-every 100000 --sample-n 0 --threads 1"
for row in "mu kl learned" "mu mse fixedlarge" "eps kl fixedsmall" "x0 kl learned" "x0 mse fixedlarge"; do
    set -- $row
    name="obj_$1_$2_$3"
    ddp "$name" $OBJ --mean-type $1 --loss $2 --var-type $3 --run "$T/$name"
    trc=$rc
    # mu_theta and a learned Sigma_theta are one step's of the trained chain: full chain only
    few="--steps 20"; { [ $1 = mu ] || [ $3 = learned ]; } && few=""
    ddp "${name}_s" sample --checkpoint "$T/$name/model.ckpt" -n 1 --threads 1 $few
    src=$rc
    ddp "${name}_b" bpd --checkpoint "$T/$name/model.ckpt" -n 1 --data-dir "$D" --threads 1 $few
    [ $trc -eq 0 ] && [ $src -eq 0 ] && [ $rc -eq 0 ] && grep -q "objective (Table 2): --mean-type $1 --var-type $3 --loss $2" "$T/$name.err" &&
        grep -q "^  total" "$T/${name}_b.out" && tool npy "$T/$name/samples.npy" 1,3,32,32 >/dev/null
    check "--mean-type $1 --loss $2 --var-type $3: trains; sample and bpd need no flag" $? \
        "exit $trc/$src/$rc: $(err_of "$name") $(err_of "${name}_s") $(err_of "${name}_b")"
done
grep -q "sigma_t^2 = learned" "$T/obj_mu_kl_learned_b.out"
check "bpd of a learned Sigma says so" $? "$(head -n 1 "$T/obj_mu_kl_learned_b.out")"
ddp obj_resume $OBJ --steps 5 --run "$T/obj_mu_kl_learned" --resume
[ $rc -eq 0 ] && grep -q "objective (Table 2): --mean-type mu --var-type learned --loss kl" "$T/obj_resume.err" &&
    [ "$(last_step "$T/obj_mu_kl_learned/log.csv")" = 5 ]
check "--resume without the objective's flags continues with the checkpoint's" $? "exit $rc: $(err_of obj_resume)"
LEARNED=$T/obj_mu_kl_learned/model.ckpt
bad "resume with another --loss" "--loss kl" $OBJ --steps 6 --run "$T/obj_mu_kl_learned" --resume --loss mse
bad "sample with another --mean-type" "--mean-type mu" sample --checkpoint "$LEARNED" --mean-type eps --out "$T/never12.png"
bad "bpd with another --var-type" "--var-type learned" bpd --checkpoint "$LEARNED" --var-type fixedlarge
bad "fewer steps on a learned Sigma" "predicts one step of the" sample --checkpoint "$LEARNED" --steps 50 --out "$T/never12.png"
bad "fewer steps on a predicted mu" "--mean-type mu predicts one step" bpd --checkpoint "$T/obj_mu_mse_fixedlarge/model.ckpt" --steps 50
bad "--sigma on a learned Sigma" "--sigma" sample --checkpoint "$LEARNED" --sigma beta_tilde --out "$T/never12.png"
bad "DDIM on a learned Sigma" "--sampler ddim" sample --checkpoint "$LEARNED" --sampler ddim --out "$T/never12.png"
bad "DPM-Solver++ on a learned Sigma" "--sampler dpm++" sample --checkpoint "$LEARNED" --sampler dpm++ --out "$T/never12.png"
bad "--loss simple --mean-type mu" "--loss simple" $OBJ --mean-type mu --loss simple --run "$T/never12"
bad "--var-type learned --loss mse" "--var-type learned" $OBJ --var-type learned --loss mse --run "$T/never12"
bad "--var-type learned with the default loss" "--var-type learned" $OBJ --var-type learned --run "$T/never12"
bad "--mean-type xstart" "--mean-type xstart" $OBJ --mean-type xstart --run "$T/never12"
bad "--loss vlb" "--loss vlb" $OBJ --loss vlb --run "$T/never12"
[ ! -e "$T/never12" ] && [ ! -e "$T/never12.png" ]
check "refused objectives create no run folder and no picture" $? "$(ls -d "$T"/never12* 2>&1)"
# A header whose objective bytes (offset 108: mean, var, loss, pad) are out of range, or a
# combination that cannot train, re-sealed with a valid checksum: refused as corrupt.
tool reseal "$LEARNED" "$T/obj_bad.ckpt" 108 B 7
hostile "objective byte out of range" sample --checkpoint "$T/obj_bad.ckpt" -n 1 --out "$T/never12.png"
tool reseal "$LEARNED" "$T/obj_bad2.ckpt" 110 B 0
hostile "objective learned + simple" sample --checkpoint "$T/obj_bad2.ckpt" -n 1 --out "$T/never12.png"


# ---------------------------------------------------------------------------
# 13. Weights in and out (ddpm.c section 21's exchange files), and bpd --t-samples.
ddp exp export --checkpoint "$GOOD" --out "$T/w.ref" --threads 1
erc=$rc
ddp imp import --weights "$T/w.ref" --out "$T/imp.ckpt" --batch 4 --threads 1
irc=$rc
ddp s_orig sample --checkpoint "$GOOD" -n 2 --steps 10 --threads 1 --out "$T/orig.png"
ddp s_imp sample --checkpoint "$T/imp.ckpt" -n 2 --steps 10 --threads 1 --out "$T/imp.png"
[ $erc -eq 0 ] && [ $irc -eq 0 ] && [ $rc -eq 0 ] && cmp -s "$T/orig.npy" "$T/imp.npy"
check "export, then import: the same EMA weights (samples bit for bit)" $? "exit $erc/$irc/$rc: $(err_of exp) $(err_of imp)"
tool exmut "$T/w.ref" "$T/w_rev.ref" reverse
ddp imp_rev import --weights "$T/w_rev.ref" --out "$T/imp_rev.ckpt" --threads 1
ddp s_rev sample --checkpoint "$T/imp_rev.ckpt" -n 2 --steps 10 --threads 1 --out "$T/rev.png"
[ $rc -eq 0 ] && cmp -s "$T/orig.npy" "$T/rev.npy"
check "import matches tensors by name, in any record order" $? "exit $rc: $(err_of imp_rev)"
mkdir -p "$T/impr" && cp "$T/imp.ckpt" "$T/impr/model.ckpt"
step=$(sed -n 's/.*(step \([0-9]*\),.*/\1/p' "$T/exp.err")
ddp impr $OVF --steps $((step + 3)) --run "$T/impr" --resume
[ $rc -eq 0 ] && [ "$(last_step "$T/impr/log.csv")" = $((step + 3)) ] && grep -q "resumed .* at step $step" "$T/impr.err"
check "an imported checkpoint trains on with --resume" $? "exit $rc: $(err_of impr)"
for mode in rename drop double cut; do
    tool exmut "$T/w.ref" "$T/w_$mode.ref" $mode
    hostile "import, a tensor $mode" import --weights "$T/w_$mode.ref" --out "$T/never13.ckpt"
done
grep -q "conv9.weight is not a tensor" "$T/h_import, a tensor rename.err" && grep -q "has no param\..*conv1.weight" "$T/h_import, a tensor drop.err"
check "import names the tensor that is unknown or missing" $? "$(err_of "h_import, a tensor rename") $(err_of "h_import, a tensor drop")"
hostile "import of a checkpoint" import --weights "$GOOD" --out "$T/never13.ckpt"
bad "import onto an existing file" "already exists" import --weights "$T/w.ref" --out "$T/imp.ckpt"
bad "import without --weights" "--weights" import --out "$T/never13.ckpt"
bad "--weights on sample" "--weights" sample --checkpoint "$GOOD" --weights "$T/w.ref" --out "$T/never13.png"
bad "export without --out" "--out" export --checkpoint "$GOOD"
[ ! -e "$T/never13.ckpt" ] && [ ! -e "$T/never13.ckpt.tmp" ] && [ ! -e "$T/never13.png" ]
check "refused imports write nothing" $? "$(ls "$T"/never13* 2>&1)"
ddp ts999 bpd --checkpoint "$GOOD" -n 2 --data-dir "$D" --threads 1 --t-samples 999
[ $rc -eq 0 ] && [ "$(grep total "$T/ts999.out")" = "$(grep total "$T/pert.out")" ]
check "bpd --t-samples 999 (every stratum one t) = bpd" $? "exit $rc: $(grep total "$T/ts999.out" "$T/pert.out" | tr '\n' ' ')"
ddp ts50 bpd --checkpoint "$GOOD" -n 2 --data-dir "$D" --threads 1 --t-samples 50
[ $rc -eq 0 ] && grep -q "estimated from 50 stratified t" "$T/ts50.out" && awk '/^  total / { exit !($4 > 0 && $4 < 100) }' "$T/ts50.out"
check "bpd --t-samples 50: an estimate, said so, finite" $? "exit $rc: $(tr '\n' '|' <"$T/ts50.out")"
bad "--t-samples 1000" "--t-samples 1000" bpd --checkpoint "$GOOD" -n 1 --data-dir "$D" --t-samples 1000
bad "--t-samples with --per-t" "--t-samples" bpd --checkpoint "$GOOD" -n 1 --data-dir "$D" --t-samples 10 --per-t "$T/never13.csv"
bad "--t-samples on sample" "--t-samples" sample --checkpoint "$GOOD" --t-samples 10 --out "$T/never13.png"

# ---------------------------------------------------------------------------
# 15. Hardening II: outputs that are inputs, links in a run folder, stdout, NaN pictures,
# exchange files that lie, signals, messages.
cp "$GOOD" "$T/keep.ckpt"
same_good() { cmp -s "$GOOD" "$T/keep.ckpt"; }
hostile "sample --out the checkpoint" sample --checkpoint "$GOOD" -n 1 --steps 2 --out "$GOOD"
hostile "sample --npz the checkpoint" sample --checkpoint "$GOOD" -n 1 --steps 2 --out "$T/n15.png" --npz "$GOOD"
hostile "bpd --per-t the checkpoint" bpd --checkpoint "$GOOD" -n 1 --data-dir "$D" --per-t "$GOOD"
hostile "reconstruct --out the checkpoint" reconstruct --checkpoint "$GOOD" --data-dir "$D" --index 0 --t 2 --out "$GOOD"
hostile "export --out the checkpoint" export --checkpoint "$GOOD" --out "$GOOD"
ln "$GOOD" "$T/hard.ckpt"
hostile "sample --out a hard link of the checkpoint" sample --checkpoint "$GOOD" -n 1 --steps 2 --out "$T/hard.ckpt"
hostile "sample --out x.npy: its .npy would replace the grid" sample --checkpoint "$GOOD" -n 1 --steps 2 --out "$T/x15.npy"
same_good && [ ! -e "$T/n15.png" ] && [ ! -e "$T/x15.npy" ]
check "outputs that are inputs: refused before any work, the checkpoint byte-identical" $? "$(ls "$T" | grep 15)"
mkdir -p "$T/linklog" && echo keep >"$T/target15" && ln -s "$T/target15" "$T/linklog/log.csv"
hostile "a log.csv symlink in the run folder" $RUN --steps 2 --run "$T/linklog" --threads 1
mkdir -p "$T/hardlock" && echo keep >"$T/target15b" && ln "$T/target15b" "$T/hardlock/lock"
hostile "a hard-linked lock in the run folder" $RUN --steps 2 --run "$T/hardlock" --threads 1
[ "$(cat "$T/target15")" = keep ] && [ "$(cat "$T/target15b")" = keep ] && [ ! -e "$T/linklog/model.ckpt" ]
check "links in a run folder: their targets untouched, no run" $? "$(cat "$T/target15" "$T/target15b" | tr '\n' ' ')"
bad "--out ''" "--out" sample --checkpoint "$GOOD" --out ""
bad "--run ''" "--run" $RUN --run ""
for c in schedule params help; do
    $TO "$DDPM" $c >/dev/full 2>"$T/full_$c.err"
    rc=$?
    [ $rc -eq 1 ] && one_line "$T/full_$c.err"
    check "./ddpm $c > /dev/full: exit 1, one line" $? "exit $rc: $(err_of "full_$c")"
done
ddp mult2 params --data fashion-mnist --ch 8 --ch-mult 2,2 --attn none --groups 4
grep -Eq '^norm_out +32$' "$T/mult2.out" && grep -Eq '^conv_out +145$' "$T/mult2.out"
check "--ch-mult 2,2: norm_out and conv_out take the last block's 16 channels" $? "$(grep _out "$T/mult2.out" | tr '\n' ' ')"
tool big "$LEARNED" "$T/big.ckpt"   # a learned Sigma: its log-variance output is not clipped as x0_hat is
ddp nanpic sample --checkpoint "$T/big.ckpt" -n 2 --out "$T/nan15.png" --npz "$T/nan15.npz" --threads 1
[ $rc -eq 1 ] && one_error "$T/nanpic.err" && grep -q "left the finite range at t = " "$T/nanpic.err" &&
    [ ! -e "$T/nan15.png" ] && [ ! -e "$T/nan15.npy" ] && [ ! -e "$T/nan15.npz" ]
check "a network that gives NaN: exit 1, one line naming the step, no picture" $? "exit $rc: $(err_of nanpic)"
ddp nanrec reconstruct --checkpoint "$T/big.ckpt" --data-dir "$D" --index 0 --t 3 -k 1 --out "$T/nan15r.png" --threads 1
[ $rc -eq 1 ] && one_error "$T/nanrec.err" && grep -q "left the finite range" "$T/nanrec.err" && [ ! -e "$T/nan15r.png" ]
check "reconstruct with a network that gives NaN: exit 1, one line, no picture" $? "exit $rc: $(err_of nanrec)"
ddp exp15 export --checkpoint "$GOOD" --out "$T/w15.ref" --threads 1
imp_refused() {   # imp_refused NAME WORD FILE: import refuses it in one line naming WORD, writes nothing
    ddp "imp_$1" import --weights "$3" --out "$T/never15.ckpt" --threads 1
    [ $rc -eq 1 ] && one_line "$T/imp_$1.err" && grep -qF -- "$2" "$T/imp_$1.err" && [ ! -e "$T/never15.ckpt" ]
    check "import refuses $1 in one line" $? "exit $rc: $(err_of "imp_$1")"
}
tool exset "$T/w15.ref" "$T/obj2.ref" config.objective 0,1 && imp_refused "a 2-value config.objective" "config.objective" "$T/obj2.ref"
tool exset "$T/w15.ref" "$T/dnan.ref" config.dropout nan && imp_refused "a NaN config.dropout" "config.dropout" "$T/dnan.ref"
tool exset "$T/w15.ref" "$T/d2.ref" config.dropout 0.1,0.2 && imp_refused "a 2-value config.dropout" "config.dropout" "$T/d2.ref"
tool exdup "$T/w15.ref" "$T/dup.ref" config.ch && imp_refused "a repeated config.ch" "config.ch twice" "$T/dup.ref"
tool exset "$T/w15.ref" "$T/ch192.ref" config.ch 192 && tool exdrop "$T/ch192.ref" "$T/ch192.ref" param. &&
    ( [ -n "$E2E_ASAN" ] || ulimit -v 400000 2>/dev/null; exec $TO "$DDPM" import --weights "$T/ch192.ref" --out "$T/never15.ckpt" --threads 1 ) \
        >/dev/null 2>"$T/ch192.err"
rc=$?
[ $rc -eq 1 ] && one_line "$T/ch192.err" && grep -q "has no param" "$T/ch192.err"
check "import of a small file that claims a ch-192 network: refused before it is built (400 MB limit)" $? "exit $rc: $(err_of ch192)"
tool exrename "$T/w15.ref" "$T/esc.ref" param.conv_in.bias 'param.x\n\x1b[31m' && imp_refused "an escape sequence in a record's name" '\x1b' "$T/esc.ref"
! grep -q "$(printf '\033')" "$T/imp_an escape sequence in a record's name.err"
check "a record's name is printed escaped: no terminal control codes" $? "raw ESC in stderr"
truncate -s 300M "$T/huge.ref" 2>/dev/null || dd if=/dev/zero of="$T/huge.ref" bs=1M count=0 seek=300 2>/dev/null
( [ -n "$E2E_ASAN" ] || ulimit -v 200000 2>/dev/null; exec $TO "$DDPM" import --weights "$T/huge.ref" --out "$T/never15.ckpt" ) >/dev/null 2>"$T/huge.err"
rc=$?
[ $rc -eq 1 ] && one_line "$T/huge.err" && grep -q "bad magic" "$T/huge.err"
check "a 300 MB file that is not an exchange file: refused by its magic before it is read" $? "exit $rc: $(err_of huge)"
# A 2 GB exchange file (sparse) is mapped, not read: refused for its junk record within 100 MB
"$PY" -c '
import struct, sys
name = b"param.junk"
n = (2 << 30) // 4
with open(sys.argv[1], "wb") as f:
    f.write(b"DDPMREF1" + struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 1, n))
    f.truncate(f.tell() + 4 * n)
' "$T/sparse.ref"
"$PY" -c '
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(r.returncode, "%.0f" % rss, r.stderr.strip().replace("\n", "|"))
' "$DDPM" import --weights "$T/sparse.ref" --out "$T/never15.ckpt" $NET --threads 1 >"$T/sparse.out"
read src_rc src_mb src_err <"$T/sparse.out"
[ "$src_rc" = 1 ] && { [ -n "$E2E_ASAN" ] || [ "$src_mb" -lt 100 ]; } && grep -q "param.junk is not a tensor" "$T/sparse.out"
check "a 2 GB exchange file is mapped, not read: refused within 100 MB of memory" $? "$(cat "$T/sparse.out")"
tool exdrop "$T/w15.ref" "$T/noconf.ref" config.in_ch && tool exdrop "$T/noconf.ref" "$T/noconf.ref" config.ch &&
    tool exdrop "$T/noconf.ref" "$T/noconf.ref" config.num_res_blocks && tool exdrop "$T/noconf.ref" "$T/noconf.ref" config.groups &&
    tool exdrop "$T/noconf.ref" "$T/noconf.ref" config.img && tool exdrop "$T/noconf.ref" "$T/noconf.ref" config.attn &&
    tool exset "$T/noconf.ref" "$T/noconf.ref" config.objective 2,0,1
ddp impx0 import --weights "$T/noconf.ref" --out "$T/x0.ckpt" $NET --threads 1
[ $rc -eq 0 ] && [ "$(tool byte "$T/x0.ckpt" 108)" = 2 ]
check "import without the network's config.* records keeps the file's objective (x0)" $? "exit $rc: $(err_of impx0)"
tool reseal "$GOOD" "$T/big_step.ckpt" 112 Q 16777217
ddp exp_big export --checkpoint "$T/big_step.ckpt" --out "$T/big_step.ref" --threads 1
ddp imp_big import --weights "$T/big_step.ref" --out "$T/big_step2.ckpt" --batch 4 --threads 1
[ $rc -eq 0 ] && [ "$(tool u64 "$T/big_step2.ckpt" 112)" = 16777217 ]
check "export then import keeps step 16,777,217 (past float32's 2^24)" $? "exit $rc: $(err_of imp_big); step $(tool u64 "$T/big_step2.ckpt" 112 2>&1)"
( [ -n "$E2E_ASAN" ] || ulimit -v 300000 2>/dev/null; exec $TO "$DDPM" params --ch 512 --threads 1 ) >"$T/p512.out" 2>"$T/p512.err"
rc=$?
[ $rc -eq 0 ] && grep -Eq '^total +282998275$' "$T/p512.out"
check "params of a 283M-parameter network within 300 MB: counted, not allocated" $? "exit $rc: $(err_of p512)"
bad "--threads 1024" "--threads" params --threads 1024
OMP_NUM_THREADS=100000 $TO "$DDPM" params >/dev/null 2>"$T/omp.err"
rc=$?
[ $rc -eq 0 ] && one_line "$T/omp.err" && grep -q "using 256" "$T/omp.err"
check "OMP_NUM_THREADS=100000: capped at 256, said in one line" $? "exit $rc: $(err_of omp)"
( trap '' XFSZ; ulimit -f 100 && exec $TO "$DDPM" sample --checkpoint "$GOOD" -n 1 --steps 10 --trace --out "$T/ftrace.png" --threads 1 ) \
    >/dev/null 2>"$T/ftrace.err"
rc=$?
[ $rc -eq 1 ] && one_error "$T/ftrace.err"
check "sample --trace on a full disk: exit 1, one error line" $? "exit $rc: $(err_of ftrace)"
# A run that overflows right after a checkpoint: resuming it replays the same batch, so
# the advice is a new run, and both halves of that advice are checked here.
LR1="--data-dir $D $NET --batch 4 --mean-type mu --loss kl --var-type learned --warmup 0 --sample-every 1 --sample-n 0 --threads 1"
ddp lr1 $LR1 --lr 1 --steps 50 --run "$T/lr1"
[ $rc -eq 1 ] && one_error "$T/lr1.err" && grep -q "start a new run (--run DIR) with a lower --lr" "$T/lr1.err"
check "the loss overflows right after a checkpoint: exit 1, the advice is a new run" $? "exit $rc: $(err_of lr1)"
bad_step=$(sed -n 's/.*became [a-z]* at step \([0-9]*\);.*/\1/p' "$T/lr1.err")
ddp lr1r $LR1 --lr 1e-6 --steps 50 --run "$T/lr1" --resume
grep -q "at step $bad_step;" "$T/lr1r.err" && [ $rc -eq 1 ]
check "  ... and true: resuming it at --lr 1e-6 overflows at the same step $bad_step" $? "exit $rc: $(err_of lr1r)"
ddp lr1n $LR1 --lr 1e-4 --steps $((bad_step + 2)) --run "$T/lr1new"
[ $rc -eq 0 ]
check "  ... and a new run at a lower --lr goes past step $bad_step" $? "exit $rc: $(err_of lr1n)"
# Bad flags are refused before the network is built: the tiny preset at 64 images needs
# ~600 MB of activations, and these run under a 300 MB limit.
ddp tinyck --data-dir "$D" --batch 1 --steps 1 --sample-n 0 --run "$T/tinyck" --threads 1
TINY=$T/tinyck/model.ckpt
before_build() {   # before_build NAME WORD ARGS...: exit 1 or 2, one line with WORD, under 300 MB
    bname=$1; bword=$2; shift 2
    ( [ -n "$E2E_ASAN" ] || ulimit -v 300000 2>/dev/null; exec $TO "$DDPM" "$@" --threads 1 ) >/dev/null 2>"$T/bb_$bname.err"
    rc=$?
    [ $rc -ge 1 ] && [ $rc -le 2 ] && one_line "$T/bb_$bname.err" && grep -qF -- "$bword" "$T/bb_$bname.err"
    check "refused before the network is built ($bname)" $? "exit $rc: $(err_of "bb_$bname")"
}
before_build "sample --out in a missing folder" "does not exist" sample --checkpoint "$TINY" --out "$T/nowhere/s.png"
before_build "reconstruct --t 2000" "--t 2000" reconstruct --checkpoint "$TINY" --data-dir "$D" --index 0 --t 2000 -k 64
before_build "reconstruct --index 99" "--index 99" reconstruct --checkpoint "$TINY" --data-dir "$D" --index 99 -k 64
before_build "bpd --t-samples 1000" "--t-samples" bpd --checkpoint "$TINY" --data-dir "$D" --t-samples 1000
# SIGPIPE: training whose stderr goes to a reader that left (| head) saves and stops
mkfifo "$T/pipe15"
( head -c 1 <"$T/pipe15" >/dev/null ) &
$TO "$DDPM" $RUN --steps 100000 --log-every 1 --sample-every 1000 --threads 1 --run "$T/sigpipe" 2>"$T/pipe15"
rc=$?
[ $rc -eq 141 ] && [ -f "$T/sigpipe/model.ckpt" ]
check "SIGPIPE (stderr into | head): exit 141, the checkpoint saved" $? "exit $rc, $(ls "$T/sigpipe" 2>&1 | tr '\n' ' ')"
interrupt HUP sighup
[ $rc -eq 129 ] && [ -n "$n" ] && [ "$n" -ge 3 ] && [ -f "$T/sighup/model.ckpt" ]
check "SIGHUP (a closed terminal): exit 129, the checkpoint saved" $? "exit $rc: $(err_of sighup)"

# ---------------------------------------------------------------------------
# 14. Hardening III (issue 36): the run folder's film, --resume, evaluation memory, the
# self-restart. Each check is named after its defect.
peak() {   # peak NAME ARGS...: run ./ddpm, print "EXIT PEAK_MB" into $T/NAME.out, stderr into $T/NAME.err
    pname=$1; shift
    "$PY" -c '
import resource, subprocess, sys
r = subprocess.run(sys.argv[2:], stderr=open(sys.argv[1], "w"), stdout=subprocess.DEVNULL)
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
' "$T/$pname.err" $TO "$DDPM" "$@" >"$T/$pname.out"
    read rc mb <"$T/$pname.out"
}
FILM="--data-dir $D $NET --batch 4 --steps 2 --sample-every 1 --sample-n 1 --threads 1"
mkdir -p "$T/fifo_film" && mkfifo "$T/fifo_film/progress.png"
ddp fifo_film $FILM --run "$T/fifo_film"
[ $rc -eq 1 ] && one_error "$T/fifo_film.err" && grep -q "progress.png is not a plain file" "$T/fifo_film.err"
check "#36.3 a FIFO named progress.png: refused at the start in one line, no hang" $? "exit $rc: $(err_of fifo_film)"
mkdir -p "$T/link_film" && ln -s /dev/null "$T/link_film/progress.png"
ddp link_film $FILM --run "$T/link_film"
[ $rc -eq 1 ] && one_error "$T/link_film.err" && grep -q "progress.png is a symbolic link" "$T/link_film.err"
check "#36.3 a symbolic link named progress.png: refused at the start, not exit 0 with the film stopped" $? "exit $rc: $(err_of link_film)"
ddp film_ok $FILM --run "$T/film_ok"
[ $rc -eq 0 ] && [ -f "$T/film_ok/progress.png" ] && ! grep -q "note: the film" "$T/film_ok.err"
check "#36.3 ... and a run folder without one writes its film as before" $? "exit $rc: $(err_of film_ok)"
mkdir -p "$T/film_fails/progress.png.tmp"   # a folder where the film's temporary file goes: every write fails
ddp film_fails $FILM --steps 3 --run "$T/film_fails"
[ $rc -eq 0 ] && [ "$(grep -c 'progress.png.tmp' "$T/film_fails.err")" -eq 1 ] &&
    tail -n 1 "$T/film_fails.err" | grep -q "note: the film .*progress.png stopped at step 1"
check "#36.3 a film that cannot be written mid-run: said once, and again at the end of the run" $? "exit $rc: $(err_of film_fails)"
peak resume_net --data-dir "$D" $NET --batch 4 --steps 3 --resume --model paper --ch 128 --run "$T/film_ok"
[ "$rc" = 2 ] && one_line "$T/resume_net.err" && grep -q "was trained with another network" "$T/resume_net.err" &&
    { [ -n "$E2E_ASAN" ] || [ "$mb" -lt 150 ]; }
check "#36.6 --resume with another network: refused before it is built (${mb} MB; paper at batch 4 is ~1 GB)" $? "exit $rc: $(err_of resume_net)"
peak resume_batch --data-dir "$D" $NET --batch 4096 --steps 3 --resume --run "$T/film_ok"
[ "$rc" = 2 ] && one_line "$T/resume_batch.err" && grep -q "resume with --batch 4" "$T/resume_batch.err" &&
    { [ -n "$E2E_ASAN" ] || [ "$mb" -lt 150 ]; }
check "#36.6 --resume --batch 4096 on a batch-4 run: refused before anything is built (${mb} MB)" $? "exit $rc: $(err_of resume_batch)"
peak bpd_exact bpd --checkpoint "$TINY" --data-dir "$D" -n 4 --t-samples 1 --threads 1
mb_exact=$mb
peak bpd_few bpd --checkpoint "$TINY" --data-dir "$D" -n 100000 --t-samples 1 --threads 1
[ "$rc" = 0 ] && { [ -n "$E2E_ASAN" ] || [ "$mb" -le $((mb_exact + 20)) ]; }
check "#36.7 bpd -n 100000 on 4 test images: its batch is sized by the images there are (${mb} MB, -n 4: ${mb_exact} MB)" $? "exit $rc: $(err_of bpd_few)"
if [ -z "$E2E_ASAN" ]; then   # under ASan no address-space limit holds: it would sample them all
    ( ulimit -v 1000000 2>/dev/null; exec $TO "$DDPM" sample --checkpoint "$T/film_ok/model.ckpt" -n 100000 \
        --steps 1 --out "$T/many.png" --threads 1 ) >/dev/null 2>"$T/many.err"
    rc=$?
    [ $rc -eq 1 ] && one_line "$T/many.err" && grep -q -- "-n" "$T/many.err" && ! grep -q -- "--batch" "$T/many.err"
    check "#36.7 sample -n 100000 without the memory: one line that names -n, not --batch" $? "exit $rc: $(err_of many)"
fi
for ld in /lib64/ld-linux-x86-64.so.2 /lib/ld-linux-aarch64.so.1; do [ -x "$ld" ] && break; done
if [ -x "$ld" ]; then
    $TO "$ld" "$DDPM" schedule >"$T/ldso.out" 2>"$T/ldso.err"
    rc=$?
    [ $rc -eq 0 ] && [ "$(lines "$T/ldso.out")" -eq 1001 ]
    check "#36.9 run by the dynamic loader ($ld ./ddpm schedule): no self-restart into the loader" $? "exit $rc: $(err_of ldso)"
fi
if command -v valgrind >/dev/null 2>&1 && [ -z "$E2E_ASAN" ]; then   # valgrind knows no AVX-512: a plain x86-64 build
    stb=/usr/include/stb; [ -f $stb/stb_image.h ] || stb=build/stb
    ${CC:-cc} -std=c11 -O0 -fopenmp -I$stb ddpm.c -o "$T/ddpm_vg" -lm 2>"$T/vg_build.err" &&
        $TO valgrind -q "$T/ddpm_vg" schedule >"$T/vg.out" 2>"$T/vg.err"
    rc=$?
    [ $rc -eq 0 ] && [ "$(lines "$T/vg.out")" -eq 1001 ]
    check "#36.9 under valgrind (valgrind ./ddpm schedule): no self-restart into valgrind's tool" $? "exit $rc: $(err_of vg)"
elif [ "$CI" = "true" ] && [ -z "$E2E_ASAN" ]; then
    check "#36.9 under valgrind" 1 "valgrind is not installed (see .ci/run)"
fi

# ---------------------------------------------------------------------------
# 15. The benchmark (tests/bench_ddpm.c, make bench): it runs, and refuses what it cannot do.
# (Its times are figures for make bench, never assertions.)
if [ -x tests/bench_ddpm ]; then
    $TO tests/bench_ddpm --model tiny --batch 2 --steps 1 --warmup-steps 0 --threads 1 >"$T/bench.out" 2>"$T/bench.err"
    rc=$?
    [ $rc -eq 0 ] && "$PY" -c '
import json, sys
d = json.loads(open(sys.argv[1]).read())
need = ("train_ms", "sample_ms", "fma_peak_gflops", "matmul_gflops", "conv3x3", "params", "max_rss_mb")
missing = [k for k in need if k not in d]
assert not missing and d["params"] > 0 and len(d["train_ms_all"]) == 1, (missing, d.get("params"))
' "$T/bench.out"
    check "bench_ddpm: one JSON line with the step times, the FMA peak and the matmul check" $? "exit $rc: $(tr '\n' '|' <"$T/bench.err" | cut -c1-200)"
    $TO tests/bench_ddpm --model tiny --steps 100001 >"$T/bench2.out" 2>"$T/bench2.err"
    rc=$?
    [ $rc -eq 2 ] && one_line "$T/bench2.err" && grep -q -- "--steps 100001" "$T/bench2.err"
    check "bench_ddpm --steps 100001: refused in one line (it used to run 10 steps silently)" $? "exit $rc: $(err_of bench2)"
else
    echo "NOTE skipped bench_ddpm: tests/bench_ddpm is not built (make tests/bench_ddpm)"
fi

finish
