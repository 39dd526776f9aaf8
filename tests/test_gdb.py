#!/usr/bin/env python3
"""The README's gdb walkthrough, run as a test: it cannot go stale.

    /usr/bin/python3 tests/test_gdb.py        (from the repository root, after make ddpm ddpm_debug)

It reads the ```sh block under "## Stepping through Algorithm 2 in gdb" in README.md:
the ./ddpm line (run as written, its run folder moved to a temporary one), the
`gdb -q --args ...` line, and the `(gdb)` commands, which it gives to `gdb -batch`.
Then it checks what gdb printed against the README's transcript:
  - every "FUNC (...) at ddpm.c:…" of the README (breakpoint hits, finish, the
    backtrace) appears in gdb's output, in that function, and the line gdb gives is
    where ddpm.c says it is: a breakpoint's, the first statement of FUNC's body; a
    caller's (finish, frames #1 and up), a statement of FUNC that calls the function
    below it. The README shows no line numbers, so an edit above them changes nothing;
  - every "$N = value" is printed; a plain number (the schedule's alpha_bar_t, which no
    training changes) must match exactly, a {...} array must hold as many numbers;
  - the backtrace holds only reference layers: no Part III kernel (a *_fast function).
Prints "PASS name" / "FAIL name: detail" lines and "N passed, N failed".
"""
import math, os, re, shutil, subprocess, sys, tempfile

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


def function_span(src, fn):
    """The lines (1-based) of fn's definition in ddpm.c: its opening line to its closing brace."""
    for i, l in enumerate(src):
        if re.match(rf"^(static |int )[^(;]*\b{fn}\(", l):
            head = "".join(src[i:i + 8]) + "{"
            if -1 < head.find(";") < head.find("{"):
                continue   # a prototype
            for j in range(i, len(src)):
                if src[j].startswith("}"):
                    return i + 1, j + 1
    return None


def first_statement(src, span):
    """The first line of code in the body of the function at span."""
    i = span[0] - 1
    while "{" not in src[i]:
        i += 1
    for j in range(i + 1, span[1]):
        t = src[j].strip()
        # (void)x; makes no code, and FAST(...) none in the debug build (-DDDPM_PLAIN)
        if t and not t.startswith(("//", "FAST")) and not re.fullmatch(r"(\(void\)\w+;\s*)+", t):
            return j + 1
    return None


def statement_at(src, n):
    """The text of the statement that holds line n (from the line after the previous ';', '{' or '}')."""
    i = n - 1
    while i > 0 and not src[i - 1].rstrip().endswith((";", "{", "}")):
        i -= 1
    j = n - 1
    while j < len(src) - 1 and not src[j].rstrip().endswith((";", "{", "}")):
        j += 1
    return " ".join(src[i:j + 1])


def main():
    lines = walkthrough("README.md")
    tmp = os.path.abspath(tempfile.mkdtemp(prefix="gdb.", dir="tests/out"))   # gdb runs there: show_K.png
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
    args[3] = os.path.abspath(args[3])   # ./ddpm_debug
    # after each `call show(EXPR, B, C, H, W)`, the tensor itself as gdb reads it (output
    # makes no $N), to check show's statistics against
    shows = [re.match(r"call show\((.+), (\d+), (\d+), (\d+), (\d+)\)$", c) for c in cmds]
    shows = [(m.group(1), *map(int, m.groups()[1:])) for m in shows if m]
    run = ["set print elements 0"]
    for c in cmds:
        run.append(c)
        m = re.match(r"call show\((.+), (\d+), (\d+), (\d+), (\d+)\)$", c)
        if m:
            run += [f"output {m.group(1)}[0]@{int(m.group(2)) * int(m.group(3)) * int(m.group(4)) * int(m.group(5))}",
                    "echo \\n"]
    gdb = ["gdb", "-q", "-batch", "-nx"] + sum((["-ex", c] for c in run), []) + ["--args"] + args[3:]
    r = subprocess.run(gdb, capture_output=True, text=True, timeout=600, cwd=tmp)
    out = r.stdout + r.stderr
    with open(os.path.join("tests/out", "gdb.log"), "w") as f:
        f.write(out)
    got_lines = out.splitlines()
    src = open("ddpm.c").read().split("\n")
    frame_re = r"(\w+) \((.*)\) at ddpm\.c:(\S+)\s*$"
    seen = {}
    below = None   # the function the previous frame line (or the finished function) names
    for e in expect:
        m = re.search(frame_re, e)
        if m:
            fn = m.group(1)
            hit = [g for g in got_lines if re.search(rf"\b{fn} \(.*\) at ddpm\.c:(\d+)\s*$", g)]
            k = seen.get(fn, 0)
            seen[fn] = k + 1
            if k >= len(hit):
                check(f"gdb shows {fn}", False, f"gdb printed {fn} {len(hit)} times, the README {k + 1} (tests/out/gdb.log)")
                continue
            n = int(re.search(r"ddpm\.c:(\d+)\s*$", hit[k]).group(1))
            # the arguments: the same names, and the same values where the README shows one
            want_args = re.findall(r"(\w+)=([^,)]*)", m.group(2))
            got_args = re.findall(r"(\w+)=([^,)]*)", re.search(rf"\b{fn} \((.*)\) at ddpm", hit[k]).group(1))
            check(f"gdb shows {fn}'s arguments as the README does",
                  [a for a, _ in want_args] == [a for a, _ in got_args] and
                  all(v == "…" or v == g for (_, v), (_, g) in zip(want_args, got_args)),
                  f"README {m.group(2)[:100]}; gdb {', '.join(a + '=' + v for a, v in got_args)[:100]}")
            span = function_span(src, fn)
            if not span or not span[0] <= n <= span[1]:
                check(f"gdb shows {fn} at ddpm.c:{n}, inside it", False, f"ddpm.c has {fn} at lines {span}")
                below = fn
                continue
            if "hit Breakpoint" in e:
                want = first_statement(src, span)
                check(f"breakpoint in {fn} at ddpm.c:{n}, its first statement", n == want, f"its first statement is line {want}")
            elif re.match(r"#0 ", e):
                check(f"frame #0 {fn} at ddpm.c:{n}, in its body", True)
            else:
                callee = below
                text = statement_at(src, n)
                calls = re.search(rf"\b{callee}\(", text) is not None
                if not calls and "COMMANDS[i].run(" in text:   # main calls the commands through their table
                    calls = re.search(rf"\{{[^}}]*\b{callee}\b[^}}]*\}}", "\n".join(src)) is not None
                check(f"{fn} at ddpm.c:{n} calls {callee}", calls, f"line {n}'s statement: {text.strip()[:120]}")
            below = fn
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
    check_shows(shows, got_lines, tmp)
    frames = [g for g in got_lines if re.match(r"#\d+ ", g)]
    fast = [g for g in frames if re.search(r"\w+_fast \(", g)]
    check("the debug build steps through reference layers only", frames and not fast,
          f"{len(frames)} frames, {len(fast)} in Part III kernels")
    shutil.rmtree(tmp, ignore_errors=True)


def check_shows(shows, got_lines, tmp):
    """Each `call show(...)`: its statistics are those of the tensor gdb reads, and its PNG
    is the grid of B images; the first (x_t at t = 996) is almost pure noise."""
    stats = [i for i, g in enumerate(got_lines) if g.startswith("image 0: mean ")]
    check("show is called as often as the README calls it", len(stats) == len(shows), f"{len(stats)} of {len(shows)}")
    for k, ((expr, B, C, H, W), i) in enumerate(zip(shows, stats)):
        values = [float(v) for v in got_lines[i + B + 1].strip("{}").split(",")]   # after B lines and "wrote"
        printed = [float(v) for v in re.findall(r"-?\d+\.\d+", got_lines[i])]
        n = C * H * W
        x = values[:n]
        mean = sum(x) / n
        want = [mean, (sum(v * v for v in x) / n - mean * mean) ** 0.5, min(x), max(x)]
        check(f"show({expr}) prints the mean, std, min and max of the tensor gdb reads",
              len(values) == B * n and all(abs(a - b) <= 6e-4 for a, b in zip(printed, want)),
              f"printed {printed}, from gdb's values {[round(v, 4) for v in want]}")
        png = os.path.join(tmp, f"show_{k + 1}.png")
        size = tuple(int.from_bytes(open(png, "rb").read()[16:24][j:j + 4], "big") for j in (0, 4)) \
            if os.path.exists(png) else None
        cols = math.ceil(math.sqrt(B))
        rows = (B + cols - 1) // cols
        check(f"show({expr}) writes show_{k + 1}.png, a grid of {B}", size == (cols * (W + 2) + 2, rows * (H + 2) + 2),
              f"size {size}")
        if k == 0:
            check("x_t at t = 996 is almost pure noise: mean ~ 0, std ~ 1", abs(want[0]) < 0.1 and abs(want[1] - 1) < 0.1,
                  f"mean {want[0]:.4f}, std {want[1]:.4f}")


if __name__ == "__main__":
    if not shutil.which("gdb"):
        print("FAIL gdb: not installed (apt-get install gdb)")
        print("0 passed, 1 failed")
        sys.exit(1)
    main()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
