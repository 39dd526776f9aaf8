#!/usr/bin/env python3
"""The README's gdb walkthrough, run as a test: it cannot go stale.

    /usr/bin/python3 tests/test_gdb.py        (from the repository root, after make ddpm ddpm_debug)

It reads the ```sh block under "## Stepping through Algorithm 2 in gdb" in README.md:
the ./ddpm line (run as written, its run folder moved to a temporary one), the
`gdb -q --args ...` line, and the `(gdb)` commands, which it gives to `gdb -batch`.
Then it checks what gdb printed against the README's transcript:
  - every "FUNC (...) at ddpm.c:LINE" of the README (breakpoint hits, finish, the
    backtrace) appears in gdb's output with the same function and line;
  - every "$N = value" is printed; a plain number (the schedule's alpha_bar_t, which no
    training changes) must match exactly, a {...} array must hold as many numbers;
  - the backtrace holds only reference layers: no Part III kernel (a *_fast function).
Prints "PASS name" / "FAIL name: detail" lines and "N passed, N failed".

    /usr/bin/python3 tests/test_gdb.py --update

rewrites the README's ddpm.c:LINE numbers to what gdb printed (the k-th appearance of a
function in the README takes the line of its k-th appearance in gdb's output), for when
code above them moved; check the diff, then run the test again.
"""
import os, re, shutil, subprocess, sys, tempfile

passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS {name}" + (f": {detail}" if detail else ""))
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def walkthrough(readme):
    text = open(readme).read()
    start = text.index("## Stepping through Algorithm 2 in gdb")
    block = text[start:].split("```sh\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


def update_readme(expect, got_lines):
    text = open("README.md").read()
    seen = {}
    for e in expect:
        m = re.search(r"(\w+) \((.*)\) at ddpm\.c:(\d+)\s*$", e)
        if not m:
            continue
        fn = m.group(1)
        hits = [g for g in got_lines if re.search(rf"\b{fn} \(.*\) at ddpm\.c:\d+\s*$", g)]
        k = seen.get(fn, 0)
        seen[fn] = k + 1
        if k < len(hits):
            line = re.search(r"ddpm\.c:(\d+)\s*$", hits[k]).group(1)
            text = text.replace(e, e[:m.start(3)] + line + e[m.end(3):], 1)
    open("README.md", "w").write(text)
    print("NOTE updated README.md's ddpm.c line numbers from gdb's output")


def main():
    lines = walkthrough("README.md")
    tmp = tempfile.mkdtemp(prefix="gdb.", dir="tests/out")
    run_dir = os.path.join(tmp, "gdb")
    train = [l for l in lines if l.startswith("./ddpm ")]
    gdb_line = [l for l in lines if l.startswith("gdb ")]
    cmds = [re.sub(r"\s+#.*$", "", l[len("(gdb) "):]) for l in lines if l.startswith("(gdb) ")]
    expect = [l for l in lines if not l.startswith(("(gdb) ", "./ddpm ", "gdb ", "make "))]
    check("README walkthrough found", len(train) == 1 and len(gdb_line) == 1 and len(cmds) >= 5,
          f"{len(train)} ./ddpm line, {len(gdb_line)} gdb line, {len(cmds)} gdb commands")
    if failed:
        return
    r = subprocess.run(train[0].replace("runs/gdb", run_dir).split(), capture_output=True, text=True, timeout=600)
    check("the walkthrough's training command", r.returncode == 0, r.stderr.strip().splitlines()[-1:] or "")
    args = gdb_line[0].replace("runs/gdb", run_dir).split()
    assert args[:3] == ["gdb", "-q", "--args"], args
    gdb = ["gdb", "-q", "-batch", "-nx"] + sum((["-ex", c] for c in cmds), []) + ["--args"] + args[3:]
    r = subprocess.run(gdb, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    with open(os.path.join("tests/out", "gdb.log"), "w") as f:
        f.write(out)
    got_lines = out.splitlines()
    for e in expect:
        m = re.search(r"(\w+) \((.*)\) at ddpm\.c:(\d+)\s*$", e)
        if m:
            fn, line = m.group(1), m.group(3)
            hit = [g for g in got_lines if re.search(rf"\b{fn} \(.*\) at ddpm\.c:(\d+)\s*$", g)]
            lines_seen = sorted({re.search(r"ddpm\.c:(\d+)\s*$", g).group(1) for g in hit})
            check(f"gdb shows {fn} at ddpm.c:{line}", line in lines_seen,
                  f"gdb printed {fn} at ddpm.c:{', '.join(lines_seen) or '(nowhere)'} (update the README walkthrough to what gdb prints: tests/out/gdb.log)")
            continue
        m = re.match(r"(\$\d+) = (.*)$", e)
        if m:
            var, want = m.group(1), m.group(2)
            got = [g[len(var) + 3:] for g in got_lines if g.startswith(var + " = ")]
            if want.startswith("{"):
                n_want = len(want.strip("{}").split(","))
                ok = bool(got) and got[0].startswith("{") and len(got[0].strip("{}").split(",")) == n_want
                check(f"gdb prints {var} as {n_want} numbers", ok, f"got {got[0] if got else '(nothing)'}")
            else:
                check(f"gdb prints {var} = {want}", bool(got) and got[0] == want, f"got {got[0] if got else '(nothing)'}")
    if "--update" in sys.argv:
        update_readme(expect, got_lines)
    frames = [g for g in got_lines if re.match(r"#\d+ ", g)]
    fast = [g for g in frames if re.search(r"\w+_fast \(", g)]
    check("the debug build steps through reference layers only", frames and not fast,
          f"{len(frames)} frames, {len(fast)} in Part III kernels")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if not shutil.which("gdb"):
        print("FAIL gdb: not installed (apt-get install gdb)")
        print("0 passed, 1 failed")
        sys.exit(1)
    main()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
