#!/usr/bin/env python3
"""The course kit: Part I of ddpm.c as exercises, and their grader (notebooks/README.md,
"Teaching with ddpm.c").

    make exercise [EX=q_sample,p_sample]   exercise/ddpm.c: ddpm.c with those functions' bodies
                                           replaced by a TODO and a line that stops the program
    make exercise-check                    grade exercise/ddpm.c, one line per function; when all
                                           pass, train it for 3 minutes and write a sample grid
    /usr/bin/python3 tests/exercise.py selftest    the grader's own tests (make test)

A function is found by its name: its body is the lines between the end of its signature and
the closing brace at the start of a line. ddpm.c carries no markers for this.
"""
import os, re, shutil, subprocess, sys, tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default set, in the order of the paper: what to re-read, and what else the checks call.
EXERCISES = {
    "q_sample": ("Eq. 4", []),
    "q_posterior_mean_variance": ("Eqs. 6-7", []),
    "predict_x0_from_eps": ("Eq. 15", []),
    "p_sample": ("Algorithm 2, line 4", ["q_posterior_mean_variance", "predict_x0_from_eps"]),
    "l_simple": ("Eq. 14", []),
    "normal_kl": ("the KL terms of Eq. 5", []),
    "discretized_gaussian_log_likelihood": ("Eq. 13", []),
}
CHECKED = set(EXERCISES) | {"prior_bpd"}   # the groups of tests/exercise_check.c
STB = "/usr/include/stb" if os.path.exists("/usr/include/stb/stb_image.h") else os.path.join(ROOT, "build/stb")


def fail(msg):
    print(f"exercise: {msg}", file=sys.stderr)
    sys.exit(1)


def find(lines, name):
    """(first line of the signature, line of its '{', line of the closing '}') of name's definition."""
    for i, l in enumerate(lines):
        if re.match(rf"^(static |_Noreturn static )[^;=]*\b{name}\(", l):
            j = i
            while not lines[j].rstrip().endswith("{"):
                if lines[j].rstrip().endswith(";"):
                    break
                j += 1
            if not lines[j].rstrip().endswith("{"):
                continue   # a prototype
            k = j + 1
            while not lines[k].startswith("}"):
                k += 1
            return i, j, k
    return None


def citation(lines, name, start):
    """What the function implements: the table's citation, else the first Eq./Alg. its comment names."""
    if name in EXERCISES:
        return EXERCISES[name][0]
    comment = " ".join(l for l in comment_above(lines, start))
    m = re.search(r"Eqs?\. \(\d+\)(?:\s*-\s*\(\d+\))?|Alg(?:orithm|\.) \d+(?:, lines? [\d-]+)?", comment)
    return m.group(0) if m else "its comment"


def comment_above(lines, start):
    """The comment over a function (across one blank line: a section's opening comment)."""
    end = start - 1 if start > 0 and not lines[start - 1].strip() else start
    i = end
    while i > 0 and lines[i - 1].startswith("//") and not lines[i - 1].startswith("// ---"):
        i -= 1
    return [l[2:].rstrip() for l in lines[i:end] if l.strip("/ ")]


def blank(src, names):
    """src with each function's body replaced by a TODO quoting its comment and a stop."""
    lines = src.split("\n")
    for name in names:
        span = find(lines, name)
        if not span:
            fail(f"{name}: no such function in ddpm.c")
        i, j, k = span
        sig = " ".join(lines[i:j + 1])
        params = re.findall(r"(\w+)\s*(?:\[\d*\])?\s*(?=[,)])", sig[sig.index("(") + 1:sig.rindex(")") + 1])
        cite = citation(lines, name, i)
        body = [f"    // TODO ({cite}): write {name}. What it computes, from its comment above:"]
        body += [f"    //  {c}" for c in comment_above(lines, i)]
        body += ["    " + " ".join(f"(void){p};" for p in params if p != "void"),
                 f'    die("{name} is not written yet ({cite})");']
        lines[j + 1:k] = body
    return "\n".join(lines)


def not_written(src):
    return set(re.findall(r'die\("(\w+) is not written yet', src))


def build(folder):
    """Builds folder/tests/check from folder/ddpm.c (reference path, -O1); returns its error text or None."""
    os.makedirs(os.path.join(folder, "tests"), exist_ok=True)
    for f in ("test_ddpm.c", "exercise_check.c"):
        shutil.copy(os.path.join(ROOT, "tests", f), os.path.join(folder, "tests", f))
    r = subprocess.run(["cc", "-std=c11", "-O1", "-DDDPM_PLAIN", "-fopenmp", "-w", f"-I{STB}",
                        os.path.join(folder, "tests", "exercise_check.c"), "-o", os.path.join(folder, "tests", "check"),
                        "-lm"], capture_output=True, text=True)
    return None if r.returncode == 0 else r.stderr


def grade(folder, quiet=False):
    """One line per exercise function of folder/ddpm.c; returns {name: 'pass'|'fail'|'blank'|'waits'}."""
    src = open(os.path.join(folder, "ddpm.c")).read()
    err = build(folder)
    if err:
        first = next((l for l in err.splitlines() if "error" in l), err.strip()[:300])
        fail(f"{folder}/ddpm.c does not compile: {first}")
    todo = not_written(src)
    names = [n for n in EXERCISES if find(src.split("\n"), n)]

    def run(name):
        cite = EXERCISES[name][0]
        if name in todo:
            return "blank", f"TODO  {name}: not written yet ({cite})"
        waits = [d for d in EXERCISES[name][1] if d in todo]
        if waits:
            return "waits", f"WAIT  {name}: its check calls {' and '.join(waits)}, not written yet"
        r = subprocess.run([os.path.join(folder, "tests", "check"), name], capture_output=True, text=True,
                           cwd=folder, timeout=600)
        fails = [l[5:] for l in r.stdout.splitlines() if l.startswith("FAIL ")]
        if r.returncode == 0 and not fails:
            return "pass", f"PASS  {name} ({cite})"
        why = fails[0] if fails else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return "fail", f"FAIL  {name}: re-read {cite}. {why}"

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, names))
    if not quiet:
        for _, line in results:
            print(line)
        print(f"{sum(s == 'pass' for s, _ in results)} of {len(results)} functions pass")
    return {n: s for n, (s, _) in zip(names, results)}


def make(names):
    names = names or list(EXERCISES)
    out = os.path.join(ROOT, "exercise")
    os.makedirs(out, exist_ok=True)
    src = open(os.path.join(ROOT, "ddpm.c")).read()
    with open(os.path.join(out, "ddpm.c"), "w") as f:
        f.write(blank(src, names))
    print(f"wrote exercise/ddpm.c: {', '.join(names)} to write; make exercise-check grades it")


def check_and_train():
    folder = os.path.join(ROOT, "exercise")
    if not os.path.exists(os.path.join(folder, "ddpm.c")):
        fail("no exercise/ddpm.c: run make exercise first")
    results = grade(folder)
    if any(s != "pass" for s in results.values()):
        sys.exit(1)
    print("every function passes: training your ddpm.c on Fashion-MNIST for 3 minutes")
    binary = os.path.join(folder, "ddpm")
    r = subprocess.run(["cc", "-std=c11", "-O3", "-march=native", "-fopenmp", "-w", f"-I{STB}",
                        os.path.join(folder, "ddpm.c"), "-o", binary, "-lm"], capture_output=True, text=True)
    if r.returncode:
        fail(f"exercise/ddpm.c does not build: {r.stderr.strip()[:300]}")
    run = os.path.join(folder, "run")
    shutil.rmtree(run, ignore_errors=True)
    r = subprocess.run([binary, "--data", "fashion-mnist", "--data-dir", os.path.join(ROOT, "data"), "--minutes", "3",
                        "--sample-n", "16", "--run", run])
    grids = sorted(f for f in os.listdir(run) if re.fullmatch(r"samples_\d+\.png", f)) if os.path.isdir(run) else []
    if r.returncode or not grids:
        fail("the training run did not finish (see above)")
    print(f"your samples (Algorithm 2, your p_sample): exercise/run/{grids[-1]}")


def selftest():
    """The grader's own tests: the original passes; each function blanked alone fails alone;
    planted errors fail with a value; make exercise writes nothing outside exercise/."""
    passed = failed = 0

    def check(name, ok, detail=""):
        nonlocal passed, failed
        passed, failed = passed + bool(ok), failed + (not ok)
        print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))

    src = open(os.path.join(ROOT, "ddpm.c")).read()
    tmp = tempfile.mkdtemp(prefix="exercise.", dir=os.path.join(ROOT, "tests", "out"))

    def graded(name, text):
        d = os.path.join(tmp, name)
        os.makedirs(d)
        open(os.path.join(d, "ddpm.c"), "w").write(text)
        return grade(d, quiet=True)

    cases = {"original": src}
    cases.update({f"blank_{n}": blank(src, [n]) for n in EXERCISES})
    plant = {"q_sample: sqrt(abar_t) and sqrt(1 - abar_t) swapped":
             ("x_t[i] = c0 * x_0[i] + c1 * eps[i]", "x_t[i] = c1 * x_0[i] + c0 * eps[i]", "q_sample"),
             "the posterior variance beta_t in place of beta_tilde_t":
             ("if (var) var[b] = s->posterior_variance[ti];", "if (var) var[b] = s->betas[ti];",
              "q_posterior_mean_variance")}
    for what, (old, new, _) in plant.items():
        check(f"planted error ({what}) is in ddpm.c to plant", src.count(old) == 1)
        cases[what] = src.replace(old, new)
    with ThreadPoolExecutor(2) as pool:
        got = dict(zip(cases, pool.map(lambda kv: graded(re.sub(r"\W+", "_", kv[0])[:40], kv[1]), cases.items())))
    check("the original ddpm.c: every function passes", all(s == "pass" for s in got["original"].values()),
          str(got["original"]))
    for n, (cite, deps) in EXERCISES.items():
        g = got[f"blank_{n}"]
        others = {m: s for m, s in g.items() if m != n and s != "pass"}
        waiting = all(s == "waits" and n in EXERCISES[m][1] for m, s in others.items())
        check(f"{n} blanked alone: it is the one not written, no other check fails", g[n] == "blank" and waiting,
              str(g))
    for what, (_, _, n) in plant.items():
        g = got[what]
        check(f"planted error ({what}): {n} fails, the others pass",
              g[n] == "fail" and all(s == "pass" for m, s in g.items() if m != n), str(g))
    # the messages a student reads: the blank's stop, a failure's value
    d = os.path.join(tmp, "blank_q_sample")
    r = subprocess.run([os.path.join(d, "tests", "check"), "q_sample"], capture_output=True, text=True, cwd=d)
    check("a blank stops with one line naming it and its equation",
          r.returncode == 1 and r.stderr.strip() == "ddpm: q_sample is not written yet (Eq. 4)", r.stderr.strip())
    d = os.path.join(tmp, re.sub(r"\W+", "_", next(iter(plant)))[:40])
    r = subprocess.run([os.path.join(d, "tests", "check"), "q_sample"], capture_output=True, text=True, cwd=d)
    line = next((l for l in r.stdout.splitlines() if l.startswith("FAIL")), "")
    check("a planted error fails with a value, not a crash", r.returncode == 1 and re.search(r"\d", line), line)
    # make exercise: only exercise/ changes, and git sees nothing (it is ignored)
    clone = os.path.join(tmp, "clone")
    subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
    shutil.copy(os.path.join(ROOT, "ddpm.c"), clone)   # the working tree's, which may be ahead of HEAD
    for f in ("Makefile", ".gitignore", "tests/exercise.py", "tests/exercise_check.c"):
        shutil.copy(os.path.join(ROOT, f), os.path.join(clone, f))
    subprocess.run(["git", "-C", clone, "add", "-A"], check=True)
    subprocess.run(["git", "-C", clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "t",
                    "--allow-empty"], check=True)
    r = subprocess.run(["make", "-s", "-C", clone, "exercise"], capture_output=True, text=True)
    status = subprocess.run(["git", "-C", clone, "status", "--porcelain", "--ignored"], capture_output=True,
                            text=True).stdout.split("\n")
    new = [l for l in status if l.strip()]
    check("make exercise on a clean clone writes exercise/ddpm.c alone, and git reports no change",
          r.returncode == 0 and new == ["!! exercise/"] and os.path.exists(os.path.join(clone, "exercise/ddpm.c")),
          f"exit {r.returncode}, git: {new} {r.stderr.strip()[:200]}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "make":
        make([n for n in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if n])
    elif cmd == "check":
        check_and_train()
    elif cmd == "selftest":
        sys.exit(selftest())
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
