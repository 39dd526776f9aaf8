#!/usr/bin/python3
"""ddpm.c vs PyTorch on the CPU: run both benchmarks and print one table.

This is what `make bench` runs.  For each (model, batch) configuration it
runs, one after the other (never at the same time, so they do not fight over
the cores), the C benchmark

    tests/bench_ddpm --model M --batch B --steps S   (tests/bench_ddpm.c: it includes ddpm.c)

and the PyTorch one

    /usr/bin/python3 tests/bench_torch.py --model M --batch B --steps S

Each prints one line of JSON with the same keys (train_ms, sample_ms,
fwd_gflop, max_rss_mb, threads, ...).  Every run is a separate process, so
each peak RSS is that implementation's own.

The machine is shared and its speed drifts by several per cent within a
minute, so the pair is run --rounds times (default 3), alternating which side
goes first.  A ratio is the median of the rounds' ratios (each round's two runs
are adjacent in time, so drift cancels), and the per-round ratios are printed
under the table, so the spread is in plain sight.  Times are the medians over
rounds of each run's median step.

Usage:
    /usr/bin/python3 tests/bench_table.py [--quick | --only MODEL:BATCH ...] [--rounds R]
                                          [--steps S] [--ddpm PATH] [--isa avx2]

--isa avx2 (`make bench-avx2`) measures the AVX2 path on a machine with AVX-512: ddpm.c
built for x86-64-v3 (tests/bench_ddpm_avx2), and PyTorch held to AVX2 as well
(ONEDNN_MAX_CPU_ISA=AVX2 for oneDNN, OPENBLAS_CORETYPE=Haswell for OpenBLAS), for both
the benchmark and the matmul ceiling. The table says it is emulated: the CPU's caches,
clocks and ports are still the AVX-512 machine's.

A "busy" row (tiny at batch 32) runs each side beside one CPU-bound process pinned to
the last core, as a student's laptop runs a browser or a second job: losing one core of
two should cost about 2x. (ddpm.c starts itself with GOMP_SPINCOUNT=1000 for this, ddpm.c
section 18; PyTorch runs as it comes.)

--quick runs only tiny at batch 32, idle and busy.  If a run fails (non-zero exit or no
valid JSON) its stderr tail is printed, its cells read FAIL, the table goes
on, and the script exits with status 1 at the end.
"""

import argparse
import json
import os
import subprocess
import sys
from statistics import median

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)                       # the repository root
BENCH_TORCH = os.path.join(HERE, "bench_torch.py")
PYTHON = "/usr/bin/python3"                        # Debian's python3-torch

# (model, batch, busy): a busy row runs beside one CPU-bound process (see Busy below)
CONFIGS = [("tiny", 32, False), ("tiny", 32, True), ("tiny", 128, False), ("small", 32, False),
           ("small", 128, False), ("paper", 8, False), ("paper256", 1, False)]
QUICK_CONFIGS = [("tiny", 32, False), ("tiny", 32, True)]
DEFAULT_STEPS = {"tiny": 10, "small": 10, "paper": 5, "paper256": 2}
WARMUP = 2                                         # both sides' default
REQUIRED = ("train_ms", "sample_ms", "fwd_gflop", "max_rss_mb", "threads")


def log(msg):
    """Progress goes to stderr, so stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


def load_average():
    """The 1-minute load average: on this 2-core machine, anything much
    above 0 while benchmarking means another job is competing for the cores."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def cpu_summary():
    """The CPU the figures come from: model name, family/model, and its vector ISA."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "fma", "avx512f") if f in flags] or ["no avx2"]
    if "avx512f" not in flags:
        isa.append("no avx512f")
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, "
            f"model {info.get('model', '?')}), {os.cpu_count()} cores, {' '.join(isa)}")


ENV = dict(os.environ)   # --isa avx2 adds PyTorch's limits


class Busy:
    """One CPU-bound process pinned to the last core, for as long as the with-block."""

    def __init__(self, on):
        self.on, self.p = on, None

    def __enter__(self):
        if self.on:
            core = max(os.sched_getaffinity(0))
            self.p = subprocess.Popen([PYTHON, "-c", "while True: pass"],
                                      preexec_fn=lambda: os.sched_setaffinity(0, {core}))
        return self

    def __exit__(self, *exc):
        if self.p:
            self.p.kill()
            self.p.wait()


def run_json(cmd, required, timeout, busy=False):
    """Run cmd (beside a busy core if busy); return (dict, None) on success or (None, error text)."""
    log("  $ " + " ".join(cmd) + ("   (beside a busy core)" if busy else ""))
    try:
        with Busy(busy):
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               timeout=timeout, env=ENV)
    except FileNotFoundError as e:
        return None, f"cannot run: {e}"
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    # The last lines of stderr, indented, to show with an error.
    tail = "".join("\n    | " + l for l in (p.stderr or "").strip().splitlines()[-15:])
    if p.returncode != 0:
        return None, f"exit status {p.returncode}{tail}"
    # The JSON is the last line of stdout that looks like an object.
    lines = [l for l in p.stdout.splitlines() if l.strip().startswith("{")]
    if not lines:
        return None, f"no JSON line on stdout{tail}"
    try:
        d = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        return None, f"bad JSON ({e}): {lines[-1][:200]}{tail}"
    missing = [k for k in required
               if not isinstance(d.get(k), (int, float)) or isinstance(d.get(k), bool)]
    if missing:
        return None, f"JSON lacks numeric {', '.join(missing)}: {lines[-1][:200]}{tail}"
    return d, None


# ---------------------------------------------------------------------------
# Derived quantities.  A training step counts as 3 forwards (see the FLOP
# rule in bench_torch.py); rates use the median step time.
# ---------------------------------------------------------------------------

def images_per_s(d):
    return d["batch"] / (d["train_ms"] * 1e-3)


def train_gflops(d):
    return 3.0 * d["fwd_gflop"] / (d["train_ms"] * 1e-3)


def sample_gflops(d):
    return d["fwd_gflop"] / (d["sample_ms"] * 1e-3)


def print_shares(title, results, peak, rates):
    """One line per config: each side's rates (label, function of a result) as % of peak."""
    for r in results:
        cells = []
        for impl in ("ddpm.c", "pytorch"):
            d = r[impl]
            parts = [label + ("FAIL" if d is None else f"{100 * rate(d) / peak:.1f}%").rjust(6)
                     for label, rate in rates]
            cells.append(f"{impl} " + " ".join(parts))
        print(f"  {title}, {r['model']:>8} batch {r['label']:<4}: " + "   ".join(cells))


def combine(runs):
    """One result from a config's rounds: median times, the largest peak RSS."""
    d = dict(runs[0])
    for key in ("train_ms", "sample_ms"):
        d[key] = median([r[key] for r in runs])
    d["max_rss_mb"] = max(r["max_rss_mb"] for r in runs)
    return d


def fmt(v, spec):
    return "FAIL" if v is None else format(v, spec)


def both(c, t, key, spec):
    """Cells for one quantity: ddpm.c, pytorch."""
    get = lambda d: None if d is None else key(d)
    return [fmt(get(c), spec), fmt(get(t), spec)]


def round_ratios(r, key):
    """ddpm.c / pytorch of one time, round by round ([] if a side failed)."""
    if r["ddpm.c"] is None or r["pytorch"] is None:
        return []
    return [c[key] / t[key] for c, t in zip(r["runs"]["ddpm.c"], r["runs"]["pytorch"]) if t[key] > 0]


def ratio(r, key):
    """The median over rounds of ddpm.c / pytorch (for times: lower is better)."""
    v = round_ratios(r, key)
    return f"{median(v):.2f}x" if v else "-"


def print_table(header1, header2, rows):
    """Right-aligned columns; header1 holds group titles over column spans."""
    n = len(header2)
    width = [max(len(str(r[i])) for r in [header2] + rows) for i in range(n)]
    # Widen the columns under a group title if the title is wider than them.
    line1, i = [], 0
    for title, span in header1:
        need = len(title) - (sum(width[i:i + span]) + 2 * (span - 1))
        if need > 0:
            width[i + span - 1] += need
        line1.append(title.center(sum(width[i:i + span]) + 2 * (span - 1)))
        i += span
    print("  ".join(line1).rstrip())
    for r in [header2] + rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, width)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only tiny at batch 32")
    ap.add_argument("--only", action="append", default=[], metavar="MODEL:BATCH",
                    help="run only this configuration (repeatable), e.g. --only tiny:128")
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of each side per configuration, alternating (default 3)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per run (default: 10, 5 for paper)")
    ap.add_argument("--ddpm", default=None,
                    help="ddpm.c's benchmark binary (default: tests/bench_ddpm, built by make bench)")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: hold PyTorch to AVX2 too (pass an x86-64-v3 build as --ddpm)")
    ap.add_argument("--timeout", type=int, default=3600,
                    help="seconds allowed for one benchmark run")
    args = ap.parse_args()
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    ddpm = os.path.abspath(args.ddpm) if args.ddpm else os.path.join(ROOT, "tests", "bench_ddpm")
    if args.isa == "avx2":
        ENV.update(ONEDNN_MAX_CPU_ISA="AVX2", DNNL_MAX_CPU_ISA="AVX2", OPENBLAS_CORETYPE="Haswell")
        print("EMULATED AVX2: ddpm.c built for x86-64-v3 (%s), PyTorch with ONEDNN_MAX_CPU_ISA=AVX2 "
              "OPENBLAS_CORETYPE=Haswell, on %s" % (os.path.basename(ddpm), cpu_summary()))
    elif "OPENBLAS_CORETYPE" not in ENV:
        # OpenBLAS 0.3.21 takes a CPU it does not know (an Intel Xeon of family 6 model 207,
        # for one) for a Prescott: SSE3 kernels, 4x slower. Then name the core the flags say.
        probe = subprocess.run([PYTHON, "-c", "import sys; sys.path.insert(0, %r); import bench_torch; "
                                "print(bench_torch.blas_info()['blas'])" % HERE], capture_output=True, text=True)
        flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
        core = "SkylakeX" if "avx512f" in flags else "Haswell" if "avx2" in flags else None
        if " Prescott " in probe.stdout and core:
            ENV["OPENBLAS_CORETYPE"] = core
            print(f"OpenBLAS took this CPU for a Prescott (SSE3): PyTorch runs with OPENBLAS_CORETYPE={core}")

    configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.only:
        configs = []
        for spec in args.only:
            model, _, batch = spec.partition(":")
            if model not in DEFAULT_STEPS or not batch.isdigit() or int(batch) < 1:
                ap.error(f"--only {spec}: want MODEL:BATCH, MODEL one of {', '.join(DEFAULT_STEPS)}")
            configs.append((model, int(batch), False))
    load_start = load_average()
    results, failures = [], []     # failures: one-line summaries for stdout
    for model, batch, busy in configs:
        steps = args.steps or DEFAULT_STEPS[model]
        common = ["--model", model, "--batch", str(batch), "--steps", str(steps)]
        row = {"model": model, "batch": batch, "steps": steps, "busy": busy,
               "label": f"{batch} busy" if busy else str(batch),
               "runs": {"ddpm.c": [], "pytorch": []}}
        cmds = {"ddpm.c": [ddpm] + common, "pytorch": [PYTHON, BENCH_TORCH] + common}
        failed = set()
        for rnd in range(args.rounds):
            log(f"== {model} batch {row['label']}, {steps} steps, round {rnd + 1} of {args.rounds}")
            for impl in (("ddpm.c", "pytorch") if rnd % 2 == 0 else ("pytorch", "ddpm.c")):
                if impl in failed:
                    continue
                d, err = run_json(cmds[impl], REQUIRED, args.timeout, busy)
                if err:
                    failed.add(impl)
                    failures.append(f"{impl} {model} batch {row['label']}: {err.splitlines()[0]}")
                    log(f"  {impl} FAILED: {err}")
                else:
                    row["runs"][impl].append(d)
        for impl in ("ddpm.c", "pytorch"):
            row[impl] = None if impl in failed else combine(row["runs"][impl])
        results.append(row)

    log("== fp32 ceiling (pytorch, 2048^3 matmul)")
    ceiling, err = run_json([PYTHON, BENCH_TORCH, "--ceiling"], ("ceiling_gflops",),
                            args.timeout)
    if err:
        failures.append(f"pytorch --ceiling: {err.splitlines()[0]}")
        log(f"  ceiling FAILED: {err}")

    # ---- the main table ------------------------------------------------
    header1 = [("", 2), ("train ms/step", 3), ("sample ms/step", 3),
               ("train img/s", 2), ("train GFLOP/s", 2), ("peak RSS MiB", 2)]
    header2 = ["model", "batch",
               "ddpm.c", "pytorch", "ratio", "ddpm.c", "pytorch", "ratio",
               "ddpm.c", "pytorch", "ddpm.c", "pytorch", "ddpm.c", "pytorch"]
    rows = []
    for r in results:
        c, t = r["ddpm.c"], r["pytorch"]
        rows.append([r["model"], r["label"]]
                    + both(c, t, lambda d: d["train_ms"], ".1f")
                    + [ratio(r, "train_ms")]
                    + both(c, t, lambda d: d["sample_ms"], ".1f")
                    + [ratio(r, "sample_ms")]
                    + both(c, t, images_per_s, ".1f")
                    + both(c, t, train_gflops, ".1f")
                    + both(c, t, lambda d: d["max_rss_mb"], ".0f"))
    print_table(header1, header2, rows)
    print("ratio = ddpm.c / pytorch (lower is better for ddpm.c), the median of the rounds' ratios:")
    for r in results:
        cells = [f"{what} " + (" ".join(f"{v:.2f}" for v in round_ratios(r, key)) or "-")
                 for what, key in (("train", "train_ms"), ("sample", "sample_ms"))]
        print(f"  {r['model']:>8} batch {r['label']:<4} round by round: " + ",  ".join(cells))
    print()

    # ---- the fp32 ceiling ------------------------------------------------
    if ceiling:
        peak = ceiling["ceiling_gflops"]
        print(f"fp32 ceiling: {peak:.1f} GFLOP/s (median 2048x2048x2048 matmul, "
              f"pytorch, {ceiling.get('threads', '?')} threads)")
        print_shares("training share of ceiling", results, peak, [("", train_gflops)])
    else:
        print("fp32 ceiling: FAIL")
    print()

    # ---- what ddpm.c was built for, and its share of the FMA peak --------
    c_runs = [d for r in results for d in r["runs"]["ddpm.c"]]
    if c_runs and "fma_peak_gflops" in c_runs[0]:
        b = c_runs[0]
        fma = median([d["fma_peak_gflops"] for d in c_runs])
        print(f"ddpm.c built for {b['isa']}: {b['vector_floats']}-float vectors, "
              f"{b['registers']} registers; tiles (rows x columns) {b['tiles']}")
        print(f"FMA peak at that width: {fma:.1f} GFLOP/s (tests/bench_ddpm's FMA loop, median of "
              f"{len(c_runs)} runs, {b['threads']} threads)")
        if "matmul_gflops" in b:
            mm = median([d["matmul_gflops"] for d in c_runs])
            ok = "below it, as it must be" if mm <= fma else "ABOVE IT: the peak is mismeasured"
            print(f"  check: ddpm.c's matmul on 1024^3 runs at {mm:.1f} GFLOP/s, {100 * mm / fma:.0f}% of the peak, {ok}")
        print_shares("effective share of FMA peak", results, fma,
                     [("train ", train_gflops), ("sample ", sample_gflops)])
        print("  3x3 convolutions of ddpm.c (C -> C at H x H, that batch): effective GFLOP/s and share of the FMA peak,")
        print("  forward / backward (input + weight gradients), by the tile the rule takes (F4, F2: Winograd's")
        print("  F(4x4, 3x3), F(2x2, 3x3); direct), then the direct conv's own:")
        for r in results:
            runs = r["runs"]["ddpm.c"]
            if not runs:
                continue
            cells = []
            for i, k in enumerate(runs[0]["conv3x3"]):
                f, g, fd, gd = (median([d["conv3x3"][i].get(key, 0) for d in runs])
                                for key in ("fwd_gflops", "bwd_gflops", "fwd_direct_gflops", "bwd_direct_gflops"))
                tile = {4: "F4", 2: "F2"}.get(k.get("winograd", 0), "direct")
                cells.append(f"{k['C']}@{k['H']}x{k['H']} {tile} {f:.0f}/{g:.0f} ({100 * f / fma:.0f}%/{100 * g / fma:.0f}%)"
                             + (f", direct {fd:.0f}/{gd:.0f}" if tile != "direct" else ""))
            print(f"    {r['model']:>8} batch {r['label']:<4}: " + "; ".join(cells))
        print("  Effective: the direct conv's multiply-adds (2 FLOPs each) over the time taken. Winograd's")
        print("  F(4x4, 3x3) does 4 times fewer multiplies (F(2x2, 3x3) 2.25 times), so it can pass 100% of")
        print("  the peak, which counts the multiplies actually done; the train and sample shares count the")
        print("  same way.")
        print()

    # ---- footer ------------------------------------------------------------
    t_any = next((r["pytorch"] for r in results if r["pytorch"]), None) or ceiling
    threads = {impl: sorted({r[impl]["threads"] for r in results if r[impl]})
               for impl in ("ddpm.c", "pytorch")}
    print("FLOPs: multiply-adds of convolutions, dense layers and the two attention "
          "matmuls, 2 FLOPs each;")
    print("       a training step = 3 x forward (forward + two backward GEMMs per layer); "
          "GFLOP/s = 3 * fwd_gflop / median train step.")
    if t_any:
        print(f"PyTorch {t_any.get('torch', '?')}: BLAS {t_any.get('blas', '?')}, "
              f"BLAS_INFO={t_any.get('blas_info', '?')}, mkldnn={t_any.get('mkldnn', '?')}")
        if "netlib" in str(t_any.get("blas", "")).lower():
            print("WARNING: PyTorch runs on the reference (netlib) BLAS, several times slower than "
                  "OpenBLAS: apt-get install libopenblas0-openmp for a fair comparison")
    print("CPU: " + cpu_summary())
    print("threads: " + ", ".join(f"{impl} {'/'.join(map(str, v)) or '?'}"
                                  for impl, v in threads.items()))
    steps = sorted({r["steps"] for r in results})
    print(f"Times are medians of {'/'.join(map(str, steps))} timed steps after "
          f"{WARMUP} warm-up steps, one process per run, runs one at a time, "
          f"then the median over {args.rounds} round(s), on a shared (noisy) machine.")
    load_end = load_average()
    print(f"Load average (1 min): {load_start:.2f} at the start, {load_end:.2f} at the end; "
          "trust only numbers from an otherwise idle machine")
    print("(both sides run OpenMP threads, which slow down when another job competes for the cores; "
          "a busy row measures that on purpose, beside one CPU-bound process on the last core).")
    # Sanity check: both sides should count the same FLOPs and parameters.
    for r in results:
        c, t = r["ddpm.c"], r["pytorch"]
        if c and t:
            for key in ("fwd_gflop", "params"):
                if key in c and key in t and abs(c[key] - t[key]) > 1e-3 * abs(t[key]):
                    print(f"WARNING: {r['model']} batch {r['batch']}: {key} differs "
                          f"(ddpm.c {c[key]}, pytorch {t[key]})")
    for f in failures:
        print(f"FAILED: {f} (stderr tail printed on stderr)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
