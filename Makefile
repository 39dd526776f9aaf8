# ddpm.c — build, debug, test, bench and data targets.
#
#   make                 build ./ddpm and fetch CIFAR-10 into data/ (offline: says so, still succeeds)
#   make plain           ./ddpm_plain: -O2 -DDDPM_PLAIN, the reference layers of section 16 only
#   make debug           ./ddpm_debug: the same at -O0 -g, for stepping through with gdb (see README)
#   make exercise        exercise/ddpm.c: Part I's functions to write (EX=q_sample,... to choose);
#                        make exercise-check grades them (tests/exercise.py, notebooks/README.md)
#   make test            C tests (on the reference build and on every kernel variant this machine
#                        runs, ARM64 under qemu), gradients vs PyTorch autograd (fast and
#                        reference builds), the README's gdb walkthrough, end-to-end tests
#   make bench           ddpm.c vs PyTorch, side by side (tests/bench_ddpm.c, a benchmark that
#                        includes ddpm.c, run by tests/bench_table.py; about 26 min;
#                        BENCH_ARGS="--quick --rounds 1" for one minute on tiny only)
#   make fuzz            libFuzzer harnesses for the checkpoint, IDX, CIFAR-10, exchange, cache and picture readers (clang),
#                        each run for FUZZ_SECONDS (12); make test runs them when clang is there
#   make sanitize        the unit, end-to-end and MPI suites under AddressSanitizer + UBSan
#   make cifar10         download + check + unpack CIFAR-10 (binary version) into data/
#   make fashion-mnist   unpack Debian's dataset-fashion-mnist into data/ (offline)
#   make official-weights  the paper's CIFAR-10 model (diffusers' google/ddpm-cifar10-32)
#                        as data/official/cifar10_ema.ckpt (needs the network once);
#                        MODEL=church-256 (bedroom-256, cat-256, celebahq-256): the 256x256
#                        LSUN / CelebA-HQ models as data/official/church-256_ema.ckpt
#   make clean
#
# Options: NO_OMP=1 (no OpenMP), NO_NATIVE=1 (no -march=native), CC=clang.

CC ?= cc
PYTHON ?= /usr/bin/python3
CFLAGS ?= -O3
# -O3, never -Ofast: fast-math lets the compiler reorder sums and drop NaN checks, which
# breaks bit-exact determinism and the finite-loss guard.
CFLAGS += -std=c11 -Wall -Wextra
# ISO C mode turns off fused multiply-add contraction; allow it (one rounding instead
# of two, and twice the matmul speed). Unlike -ffast-math it never reorders a sum.
CFLAGS += -ffp-contract=fast
# No program here enables floating-point traps, so tell the compiler so: then it may turn
# the clamps in exp_approx (SiLU, softmax) into vector selects. Without it GCC leaves
# those loops scalar on AVX2 and NEON (AVX-512 gets them through mask registers). It
# changes no result: unlike -ffast-math it keeps NaN, infinities and the order of sums.
CFLAGS += -fno-trapping-math
LDLIBS = -lm

# Probe the compiler rather than assume: -march=native and OpenMP are optional.
ifndef NO_NATIVE
  NATIVE := $(shell echo 'int main(void){return 0;}' | $(CC) -march=native -x c - -o /dev/null 2>/dev/null && echo yes)
endif
ifeq ($(NATIVE),yes)
  CFLAGS += -march=native
  $(info ddpm.c: -march=native ........ found)
  # On AVX-512 machines GCC still prefers 256-bit vectors for the loops it vectorises
  # itself (GroupNorm, SiLU, softmax); ask for the full width the kernels use.
  WIDE := $(shell echo 'int main(void){return 0;}' | $(CC) -march=native -mprefer-vector-width=512 -x c - -o /dev/null 2>/dev/null && echo yes)
  ifeq ($(WIDE),yes)
    CFLAGS += -mprefer-vector-width=512
  endif
else
  $(info ddpm.c: -march=native ........ not used)
endif
ifndef NO_OMP
  OPENMP := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo yes)
endif
ifeq ($(OPENMP),yes)
  CFLAGS += -fopenmp
  $(info ddpm.c: OpenMP ............... found)
else
  CFLAGS += -Wno-unknown-pragmas
  $(info ddpm.c: OpenMP ............... not found, building single-threaded)
endif

# stb_image_write, stb_image and stb_image_resize (v0.97): Debian's libstb-dev, else fetched
# at a pinned commit into build/stb and checked. The checksums are those of commit 8b5f1f3,
# whose three files are the very ones Debian 12 ships (compared byte for byte).
STB_COMMIT = 8b5f1f37b5b75829fc72d38e7b5d4bcbf8a26d55
STB_SHA256_stb_image_write.h = cbd5f0ad7a9cf4468affb36354a1d2338034f2c12473cf1a8e32053cb6914a05
STB_SHA256_stb_image.h = 91f435e0fc6a620018b878b9859c74dff60d28046f87e649191ad6f35a98c722
STB_SHA256_stb_image_resize.h = 6a0e75adbabb48df9031c2e39ccd97437bb226fe31e7d4a01c7bf70a18d32ec6
STB_HEADERS = stb_image_write.h stb_image.h stb_image_resize.h
ifeq ($(words $(wildcard $(STB_HEADERS:%=/usr/include/stb/%))),3)
  STB_DIR = /usr/include/stb
  STB_DEP =
else
  STB_DIR = build/stb
  STB_DEP = $(STB_HEADERS:%=build/stb/%)
endif
CFLAGS += -I$(STB_DIR)

.PHONY: all plain debug exercise exercise-check mpi test bench bench-avx2 fuzz fuzz-build sanitize cifar10 fashion-mnist emoji official-weights clean

all: ddpm
	@sh data/get_cifar10.sh --optional

ddpm: ddpm.c $(STB_DEP)
	$(CC) $(CFLAGS) ddpm.c -o $@ $(LDLIBS)

# The reference path: -DDDPM_PLAIN leaves out Part III, so every layer is the plain loop
# of section 16 (and a debugger steps into the algorithm, not into vector code).
PLAIN_CFLAGS = $(filter-out -O3,$(CFLAGS)) -DDDPM_PLAIN
plain: ddpm_plain
ddpm_plain: ddpm.c $(STB_DEP)
	$(CC) $(PLAIN_CFLAGS) -O2 ddpm.c -o $@ $(LDLIBS)

debug: ddpm_debug

# The course kit (tests/exercise.py): exercise/ddpm.c with Part I functions to write, and its grader.
exercise:
	@$(PYTHON) tests/exercise.py make $(EX)
exercise-check: fashion-mnist
	@$(PYTHON) tests/exercise.py check
ddpm_debug: ddpm.c $(STB_DEP)
	$(CC) $(PLAIN_CFLAGS) -O0 -g ddpm.c -o $@ $(LDLIBS)

# Data-parallel training over MPI (ddpm.c section 23): Debian's libopenmpi-dev openmpi-bin.
# Without it nothing here needs MPI; `make mpi` alone builds ./ddpm_mpi.
MPICC ?= mpicc
mpi: ddpm_mpi
ddpm_mpi: ddpm.c $(STB_DEP)
	@command -v $(MPICC) >/dev/null || { echo "make mpi: $(MPICC) not found; apt-get install libopenmpi-dev openmpi-bin"; exit 1; }
	OMPI_CC=$(CC) $(MPICC) $(CFLAGS) -DDDPM_MPI ddpm.c -o $@ $(LDLIBS)

build/stb/%.h:
	@mkdir -p build/stb
	@echo "fetching $*.h at $(STB_COMMIT) (or: apt-get install libstb-dev)"
	curl -fsSL --connect-timeout 20 https://raw.githubusercontent.com/nothings/stb/$(STB_COMMIT)/$*.h -o $@.part
	echo "$(STB_SHA256_$*.h)  $@.part" | sha256sum -c --quiet - && mv $@.part $@

tests/test_ddpm: tests/test_ddpm.c ddpm.c $(STB_DEP)
	$(CC) $(CFLAGS) -Wno-unused-function tests/test_ddpm.c -o $@ $(LDLIBS)

tests/dump_ref: tests/dump_ref.c ddpm.c $(STB_DEP)
	$(CC) $(CFLAGS) -Wno-unused-function tests/dump_ref.c -o $@ $(LDLIBS)

# ./ddpm with the direct conv instead of Winograd's (tests/ddpm_direct.c), to compare the two.
build/ddpm_direct: tests/ddpm_direct.c ddpm.c $(STB_DEP)
	@mkdir -p build
	$(CC) $(CFLAGS) tests/ddpm_direct.c -o $@ $(LDLIBS)

# The unit tests and the PyTorch exchange file once more on the reference layers.
tests/test_ddpm_plain: tests/test_ddpm.c ddpm.c $(STB_DEP)
	$(CC) $(PLAIN_CFLAGS) -O2 -Wno-unused-function tests/test_ddpm.c -o $@ $(LDLIBS)

tests/dump_ref_plain: tests/dump_ref.c ddpm.c $(STB_DEP)
	$(CC) $(PLAIN_CFLAGS) -O2 -Wno-unused-function tests/dump_ref.c -o $@ $(LDLIBS)

# The unit tests once more for every kernel variant of ddpm.c's section 17.0 that this
# compiler can build: x86-64-v2 (SSE), v3 (AVX2 + FMA), v4 (AVX-512), the plain C loops
# (-DDDPM_NO_SIMD), and ARM64 NEON with the cross compiler (tests/run.sh runs it under
# qemu-user). tests/run.sh runs each one the CPU can execute and says which it skips.
VARIANT_CFLAGS = $(filter-out -march=native -mprefer-vector-width=512,$(CFLAGS)) -Wno-unused-function
X86_LEVELS := $(shell for v in 2 3 4; do echo 'int main(void){return 0;}' | $(CC) -march=x86-64-v$$v -x c - -o /dev/null 2>/dev/null && echo v$$v; done)
AARCH64_CC ?= aarch64-linux-gnu-gcc
AARCH64 := $(shell echo 'int main(void){return 0;}' | $(AARCH64_CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo yes)
VARIANTS = $(X86_LEVELS:%=tests/test_ddpm_%) tests/test_ddpm_novec
ifeq ($(AARCH64),yes)
  VARIANTS += tests/test_ddpm_arm64
endif

tests/test_ddpm_v%: tests/test_ddpm.c ddpm.c $(STB_DEP)
	$(CC) $(VARIANT_CFLAGS) -march=x86-64-v$* tests/test_ddpm.c -o $@ $(LDLIBS)

tests/test_ddpm_novec: tests/test_ddpm.c ddpm.c $(STB_DEP)
	$(CC) $(VARIANT_CFLAGS) -DDDPM_NO_SIMD tests/test_ddpm.c -o $@ $(LDLIBS)

# -fno-tree-loop-vectorize: GCC 12's aarch64 loop vectoriser crashes (internal compiler
# error in vect_transform_reduction) on the tests' double-precision reductions. The
# kernels' explicit NEON vectors do not depend on it.
tests/test_ddpm_arm64: tests/test_ddpm.c ddpm.c $(STB_DEP)
	$(AARCH64_CC) $(VARIANT_CFLAGS) -fno-tree-loop-vectorize tests/test_ddpm.c -o $@ $(LDLIBS)

test: ddpm ddpm_debug tests/test_ddpm tests/dump_ref tests/bench_ddpm tests/test_ddpm_plain tests/dump_ref_plain $(VARIANTS) fashion-mnist
	@PYTHON=$(PYTHON) sh tests/run.sh

# Fuzzing (tests/fuzz_ddpm.c): one binary per loader, seeded from tests/fuzz/<target>/,
# which also keeps every input that once crashed one of them. New corpus entries go to a
# scratch folder, so the seeds in git stay as they are. Single-threaded (no -fopenmp),
# so clang needs only libclang-rt-14-dev, not libomp.
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 12
FUZZ_TARGETS = checkpoint idx cifar exchange pixels pictures
FUZZ_FLAGS = -std=c11 -O1 -g -I$(STB_DIR) -Wno-unused-function -Wno-unknown-pragmas -fsanitize-ignorelist=tests/fuzz/stb_ub.txt \
             -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
build/fuzz_checkpoint: FUZZ_ID = 1
build/fuzz_idx: FUZZ_ID = 2
build/fuzz_cifar: FUZZ_ID = 3
build/fuzz_exchange: FUZZ_ID = 4
build/fuzz_pixels: FUZZ_ID = 5
build/fuzz_pictures: FUZZ_ID = 6
build/fuzz_%: tests/fuzz_ddpm.c ddpm.c $(STB_DEP)
	@mkdir -p build
	$(FUZZ_CC) $(FUZZ_FLAGS) -DFUZZ_TARGET=$(FUZZ_ID) tests/fuzz_ddpm.c -o $@ -lm
fuzz-build: $(FUZZ_TARGETS:%=build/fuzz_%)
fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	    rm -rf build/corpus_$$t && mkdir -p build/corpus_$$t && cp tests/fuzz/$$t/* build/corpus_$$t/ && \
	    echo "fuzz_$$t: $(FUZZ_SECONDS) s" && \
	    ASAN_OPTIONS=detect_leaks=0 build/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=20 -rss_limit_mb=2048 \
	        -artifact_prefix=build/ build/corpus_$$t tests/fuzz/$$t 2>build/fuzz_$$t.log || \
	        { tail -n 30 build/fuzz_$$t.log; echo "fuzz_$$t: crashed; the input is in build/ (see build/fuzz_$$t.log)"; exit 1; }; \
	    grep -h 'DONE' build/fuzz_$$t.log | tail -n 1; \
	done

# Sanitizers: the program and the unit tests with AddressSanitizer and UBSan, any report
# fatal; the end-to-end suite then runs on that build, then the pictures, cache and bad input
# of tests/test_folder.py (stb_image meets hostile files there), and the MPI suite on ./ddpm_mpi
# built the same way. GCC's `undefined` leaves out float-cast-overflow ((uint8_t)NaN in a
# picture, say), so it is asked for by name. (Leak reports are off: a refusal ends the
# process with its buffers still held, by design.)
SAN_FLAGS = $(filter-out -O3 -march=native -mprefer-vector-width=512,$(CFLAGS)) -O2 -g -fno-omit-frame-pointer \
            -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all
build/ddpm_san: ddpm.c $(STB_DEP)
	@mkdir -p build
	$(CC) $(SAN_FLAGS) ddpm.c -o $@ $(LDLIBS)
build/test_ddpm_san: tests/test_ddpm.c ddpm.c $(STB_DEP)
	@mkdir -p build
	$(CC) $(SAN_FLAGS) -Wno-unused-function tests/test_ddpm.c -o $@ $(LDLIBS)
build/ddpm_mpi_san: ddpm.c $(STB_DEP)
	@mkdir -p build
	@command -v $(MPICC) >/dev/null || { echo "make sanitize: $(MPICC) not found; apt-get install libopenmpi-dev openmpi-bin"; exit 1; }
	OMPI_CC=$(CC) $(MPICC) $(SAN_FLAGS) -DDDPM_MPI ddpm.c -o $@ $(LDLIBS)
sanitize: build/ddpm_san build/test_ddpm_san fashion-mnist
	ASAN_OPTIONS=detect_leaks=0 build/test_ddpm_san
	ASAN_OPTIONS=detect_leaks=0 DDPM=build/ddpm_san E2E_SLOW=4 E2E_ASAN=1 sh tests/test_e2e.sh
	@if $(PYTHON) -c 'import numpy, PIL' 2>/dev/null; then \
	    ASAN_OPTIONS=detect_leaks=0 DDPM=build/ddpm_san FOLDER_DECODE_ONLY=1 $(PYTHON) tests/test_folder.py; \
	elif [ "$$CI" = true ]; then echo "make sanitize: tests/test_folder.py needs python3-numpy python3-pil"; exit 1; \
	else echo "NOTE skipped the folder suite under sanitizers: no numpy and PIL"; fi
	@if command -v $(MPICC) >/dev/null && command -v mpirun >/dev/null; then \
	    $(MAKE) -s build/ddpm_mpi_san && \
	    ASAN_OPTIONS=detect_leaks=0 DDPM=build/ddpm_san DDPM_MPI=build/ddpm_mpi_san sh tests/test_mpi.sh; \
	elif [ "$$CI" = true ]; then echo "make sanitize: the MPI suite needs libopenmpi-dev openmpi-bin"; exit 1; \
	else echo "NOTE skipped the MPI suite under sanitizers: no $(MPICC) (apt-get install libopenmpi-dev openmpi-bin)"; fi

tests/bench_ddpm: tests/bench_ddpm.c ddpm.c $(STB_DEP)
	$(CC) $(CFLAGS) -Wno-unused-function tests/bench_ddpm.c -o $@ $(LDLIBS)

bench: tests/bench_ddpm
	$(PYTHON) tests/bench_table.py $(BENCH_ARGS)

# The AVX2 path on any x86-64 machine with AVX2 (README, Speed): ddpm.c built for
# x86-64-v3, PyTorch held to AVX2 (tests/bench_table.py --isa avx2). Emulated, and said so.
tests/bench_ddpm_avx2: tests/bench_ddpm.c ddpm.c $(STB_DEP)
	$(CC) $(VARIANT_CFLAGS) -march=x86-64-v3 -mtune=generic tests/bench_ddpm.c -o $@ $(LDLIBS)

bench-avx2: tests/bench_ddpm_avx2
	$(PYTHON) tests/bench_table.py --isa avx2 --ddpm tests/bench_ddpm_avx2 $(BENCH_ARGS)

cifar10:
	@sh data/get_cifar10.sh

fashion-mnist:
	@sh data/get_fashion_mnist.sh

# Twemoji (npm's emoji-datasource-twitter, CC-BY 4.0) as a folder of pictures: data/emoji
# and the held-out data/emoji-test (README, "Your own pictures").
emoji:
	@sh data/get_emoji.sh

official-weights: ddpm
	@PYTHON=$(PYTHON) sh data/get_official_weights.sh $(MODEL)

clean:
	rm -rf ddpm ddpm_plain ddpm_debug ddpm_mpi tests/bench_ddpm tests/bench_ddpm_avx2 tests/test_ddpm tests/test_ddpm_v2 tests/test_ddpm_v3 tests/test_ddpm_v4 \
	    tests/test_ddpm_novec tests/test_ddpm_arm64 tests/test_ddpm_plain tests/dump_ref tests/dump_ref_plain \
	    tests/out build
