#!/usr/bin/env python3
"""The first hour of a training run (ddpm.c section 22): the default run's plan line, the
preview grids and the learning film (progress.png), which must not change the run's
bits, and CIFAR-10's loader on real files (the subset in ../shared, where it exists).
Prints "N passed, N failed".

    /usr/bin/python3 tests/test_first_hour.py

The runs use a toy network on Fashion-MNIST (make fashion-mnist), with previews from step
2 (--first-preview 2) so that a dozen steps show the whole schedule: previews at 2, 4 and
every 8, the last grid at the end.
"""
import os, shutil, subprocess, sys
import numpy as np
from PIL import Image

DDPM = os.environ.get("DDPM", "./ddpm")
T = "tests/out/first_hour"
shutil.rmtree(T, ignore_errors=True)
os.makedirs(T)
NET = ["--data", "fashion-mnist", "--data-dir", "data", "--ch", "8", "--ch-mult", "1,2", "--num-res-blocks", "1",
       "--attn", "16", "--groups", "4", "--threads", "1", "--log-every", "1000"]
B4 = ["--batch", "4"]
FILM = ["--first-preview", "2", "--sample-every", "8", "--sample-n", "4"]
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok: passed += 1; print("PASS", name)
    else: failed += 1; print("FAIL", name, (": " + detail) if detail else "")


def run(*args):
    p = subprocess.run([DDPM, *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stderr


def tail(err):
    return " | ".join(err.strip().splitlines()[-3:])


def film_rows(path, side=32, gap=2):
    """progress.png as a list of rows, each (label, images) of pixel arrays."""
    a = np.array(Image.open(path))
    rh = side + gap
    assert (a.shape[0] - gap) % rh == 0, a.shape
    rows = []
    for r in range((a.shape[0] - gap) // rh):
        strip = a[gap + r * rh:gap + r * rh + side]
        label_w = 7 * 4 * 2 + 2 * gap   # FILM_DIGITS, the font scaled by 2 at 32 px
        rows.append((strip[:, :label_w], strip[:, label_w:]))
    return rows


def grid_tiles(path, k, side=32, gap=2):
    """The first k tiles of the first row of a sample grid, side by side with a gap."""
    a = np.array(Image.open(path))
    return a[gap:gap + side, gap:gap + k * (side + gap)]


def same_file(a, b):
    return os.path.exists(a) and os.path.exists(b) and open(a, "rb").read() == open(b, "rb").read()


# --- the plan line -------------------------------------------------------------------
rc, err = run("--data", "fashion-mnist", "--data-dir", "data", "--minutes", "0.01", "--sample-n", "0",
              "--threads", "1", "--run", T + "/plan")
first = err.splitlines()[0] if err else ""
check("the default run's first line states its plan: tiny, 50000 steps of batch 32, the default",
      rc == 0 and first.startswith("plan: train tiny") and "for 50000 steps of batch 32" in first
      and "the preset's default run" in first, f"exit {rc}: {first}")
rc, err = run(*NET, *B4, *FILM, "--steps", "12", "--run", T + "/a")
first = err.splitlines()[0] if err else ""
check("--steps in the plan line, with the preview schedule",
      rc == 0 and "for 12 steps of batch 4 at lr 0.0002 (--steps)" in first and "at steps 2, 4, then every 8 steps" in first,
      f"exit {rc}: {first}")
check("a time estimate follows the first steps", rc == 0 and any(l.startswith("time: ") for l in err.splitlines()),
      tail(err))

# --- previews and the film ------------------------------------------------------------
want = [f"samples_{s:07d}_dpm10.png" for s in (2, 4, 8, 12)] + ["samples_0000012.png", "progress.png"]
have = sorted(os.listdir(T + "/a"))
check("previews at 2, 4, 8 and 12 (DPM-Solver++, 10 steps), Algorithm 2's grid at the end, progress.png",
      all(w in have for w in want) and not any(f.startswith("samples_") and f not in want for f in have),
      " ".join(have))
rows = film_rows(T + "/a/progress.png")
check("progress.png has one row per preview", len(rows) == 4, f"{len(rows)} rows")
ok = len(rows) == 4 and all(np.array_equal(rows[i][1], grid_tiles(f"{T}/a/samples_{s:07d}_dpm10.png", 2))
                            for i, s in enumerate((2, 4, 8, 12)))
check("each film row is its preview's first samples", ok)
check("the rows are labelled, each its own step",
      len(rows) == 4 and all((r[0] < 128).any() for r in rows)
      and len({r[0].tobytes() for r in rows}) == 4)
check("training changes the samples from row to row", len(rows) == 4 and not np.array_equal(rows[0][1], rows[3][1]))

# --- --minutes M: the whole run, its last grid included ---------------------------------
rc, err = run(*NET, *B4, "--minutes", "0.1", "--sample-n", "64", "--first-preview", "1000", "--run", T + "/m")
have = sorted(os.listdir(T + "/m")) if os.path.isdir(T + "/m") else []
grids = [f for f in have if f.startswith("samples_")]
check("--minutes 0.1 with 64 samples: the last grid is the last preview, said at the end, not Algorithm 2's",
      rc == 0 and len(grids) == 1 and "_dpm10" in grids[0] and "the last grid is the preview's" in err
      and "Algorithm 2's grid at the end if it takes at most a quarter of --minutes" in err.splitlines()[0],
      f"exit {rc}, {grids}: {tail(err)}")
rc, err = run(*NET, *B4, "--minutes", "100", "--steps", "3", "--sample-n", "4", "--first-preview", "1000",
              "--run", T + "/m2")
grids = sorted(f for f in os.listdir(T + "/m2") if f.startswith("samples_")) if rc == 0 else []
check("--minutes 100 --steps 3 with 4 samples: Algorithm 2's grid at the end", grids == ["samples_0000003.png",
      "samples_0000003_dpm10.png"], f"exit {rc}, {grids}: {tail(err)}")

# --- previews do not change the run ---------------------------------------------------
rc, err = run(*NET, *B4, "--sample-n", "0", "--sample-every", "8", "--steps", "12", "--run", T + "/b")
check("the checkpoint is the same bits with and without previews", rc == 0 and same_file(T + "/a/model.ckpt",
      T + "/b/model.ckpt"), tail(err))

# --- resume continues the film ---------------------------------------------------------
rc1, err1 = run(*NET, *B4, *FILM, "--steps", "6", "--run", T + "/c")
rc2, err2 = run(*NET, *FILM, "--steps", "12", "--run", T + "/c", "--resume")   # no --batch
rows_c = film_rows(T + "/c/progress.png") if rc1 == 0 and rc2 == 0 else []
check("resume continues the film: rows at 2, 4, 6, then 8, 12", len(rows_c) == 5,
      f"exit {rc1}, {rc2}, {len(rows_c)} rows: {tail(err2)}")
check("the resumed film's rows are the straight run's at the same steps",
      len(rows_c) == 5 and all(np.array_equal(rows_c[i][1], rows[j][1]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3))))
check("the resumed run ends on the straight run's bits", same_file(T + "/a/model.ckpt", T + "/c/model.ckpt"))
check("--resume takes the checkpoint's batch without --batch", rc2 == 0 and any(l.startswith("plan: ") and "of batch 4" in l for l in err2.splitlines()), tail(err2))

# A damaged film is said and started again, and the run goes on.
rc1, _ = run(*NET, *B4, *FILM, "--steps", "4", "--run", T + "/d")
open(T + "/d/progress.png", "wb").write(b"\x89PNG\r\n\x1a\n not a film")
rc2, err = run(*NET, *B4, *FILM, "--steps", "8", "--run", T + "/d", "--resume")
rows_d = film_rows(T + "/d/progress.png") if rc2 == 0 else []
check("a damaged progress.png is started again, in one line", rc1 == 0 and rc2 == 0 and len(rows_d) == 1
      and "starting it again" in err, f"exit {rc1}, {rc2}: {tail(err)}")

# --- the OpenMP wait (ddpm.c section 18) ------------------------------------------------
import time

def started_env(extra):
    """The environment ./ddpm trains under, read from /proc while it runs, started with
    os.environ less any wait setting, plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(extra)
    shutil.rmtree(T + "/wait", ignore_errors=True)
    p = subprocess.Popen([DDPM, *NET, *B4, "--steps", "100000", "--sample-n", "0", "--run", T + "/wait"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = None
    for _ in range(200):
        time.sleep(0.05)
        if os.path.exists(T + "/wait/log.csv"):   # past main's start: the environment is final
            seen = dict(kv.split("=", 1) for kv in open(f"/proc/{p.pid}/environ").read().split("\0") if "=" in kv)
            break
    p.kill()
    p.wait()
    return seen

if os.path.exists("/proc/self/environ"):
    e = started_env({})
    check("./ddpm starts itself with GOMP_SPINCOUNT=1000 when no wait policy is set",
          e is not None and e.get("GOMP_SPINCOUNT") == "1000", str(e and e.get("GOMP_SPINCOUNT")))
    e = started_env({"OMP_WAIT_POLICY": "PASSIVE"})
    check("... and keeps a wait policy the user set", e is not None and "GOMP_SPINCOUNT" not in e
          and e.get("OMP_WAIT_POLICY") == "PASSIVE", str(e and (e.get("GOMP_SPINCOUNT"), e.get("OMP_WAIT_POLICY"))))
else:
    print("NOTE skipped the OpenMP wait checks: no /proc")

# --- CIFAR-10's loader on real files ---------------------------------------------------
SUBSET = "../shared/cifar10-subset/cifar-10-batches-bin"
if not os.path.isdir(SUBSET):
    print("NOTE skipped the CIFAR-10 subset checks: no ../shared/cifar10-subset (it is not in a user's clone)")
else:
    # data_batch_5 held out as the test set (ddpm.c wants five training files: 1-4 are
    # linked twice over, which the loader reads as it reads any five)
    d = T + "/cifar/cifar-10-batches-bin"
    os.makedirs(d)
    for i in range(1, 6):
        os.symlink(os.path.abspath(f"{SUBSET}/data_batch_{(i - 1) % 4 + 1}.bin"), f"{d}/data_batch_{i}.bin")
    os.symlink(os.path.abspath(SUBSET + "/data_batch_5.bin"), d + "/test_batch.bin")
    cif = ["--data", "cifar10", "--data-dir", T + "/cifar"]
    rc, err = run(*cif, "--ch", "8", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn", "16", "--groups", "4",
                  "--batch", "4", "--steps", "2", "--sample-n", "0", "--threads", "1", "--run", T + "/cr")
    n = sum(os.path.getsize(f"{d}/data_batch_{i}.bin") // 3073 for i in range(1, 6))
    check("CIFAR-10 subset: training reads every record of the five files",
          rc == 0 and f"({n} images, 32x32, 3 channels)" in err, tail(err))
    rec = np.frombuffer(open(SUBSET + "/data_batch_5.bin", "rb").read(3073 * 3), np.uint8).reshape(3, 3073)
    rc, err = run("reconstruct", "--checkpoint", T + "/cr/model.ckpt", *cif, "--index", "2", "-k", "1",
                  "--t", "1", "--out", T + "/rec.png", "--threads", "1")
    x0 = np.load(T + "/rec.npy")[0, 0] if rc == 0 and os.path.exists(T + "/rec.npy") else None
    want = rec[2, 1:].reshape(3, 32, 32).astype(np.float32) / 127.5 - 1
    check("CIFAR-10 subset: test record 2 decodes to its bytes (R, G, B planes)",
          x0 is not None and np.abs(x0 - want).max() < 1e-6, f"exit {rc}: {tail(err)}")

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
