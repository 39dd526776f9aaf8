#!/usr/bin/python3
"""The paper's 256x256 network (ddpm.c's paper256 preset) from the command line.

The real network (113,673,219 parameters) is checked by its count, its plan and its
refusals; whatever has to run is run at a reduced width (--ch 16 --groups 4: the same
six levels from 256x256 to 8x8 and attention at 16x16), so a CPU does it in seconds:
training on a folder of pictures, sample (with --trace and --npz), reconstruct and
interpolate on the checkpoint, and the one-line refusals of data that does not fit it.
(tests/test_official.py converts the full-size network; tests/reference.py checks its
reduced-width gradients against PyTorch.) Prints "N passed, N failed".
"""
import os, re, shutil, subprocess, sys, tempfile

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DDPM = os.path.join(ROOT, "ddpm")
NARROW = ["--model", "paper256", "--ch", "16", "--groups", "4"]
results = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(("PASS " if ok else "FAIL ") + name + ("" if ok else ": " + detail), flush=True)


def ddpm(*args, timeout=600):
    r = subprocess.run([DDPM] + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr.strip()


def one_line(rc, err, word, code=None):
    return (0 < rc < 128 if code is None else rc == code) and len(err.splitlines()) == 1 and word in err


def pictures(folder, sizes, seed):
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([(x * 255 // w), (y * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))


def png_size(path):
    with Image.open(path) as im:
        return im.size


def main():
    tmp = tempfile.mkdtemp(prefix="paper256.")
    try:
        run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_fail = results.count(False)
    print(f"{len(results) - n_fail} passed, {n_fail} failed")
    return 1 if n_fail else 0


def run(tmp):
    rc, out, err = ddpm("params", "--model", "paper256")
    total = re.search(r"^total\s+(\d+)$", out, re.M)
    check("params --model paper256: 113,673,219 parameters (the paper's 114M) and the memory per image",
          rc == 0 and total and int(total.group(1)) == 113_673_219 and "activation memory:" in out,
          f"exit {rc}: {out[-300:]} {err}")
    rc, out, err = ddpm("--help")
    out = " ".join(out.split())   # --help wraps its lines
    check("--help lists paper256 and its plan (batch 64, lr 2e-05, warmup 5000, fixedsmall)",
          rc == 0 and "paper256" in out and "paper256 64" in out and "paper256 2e-05" in out
          and "paper256 5000" in out and "paper256 fixedsmall" in out, out[-400:])

    data, small, held = os.path.join(tmp, "pics"), os.path.join(tmp, "small"), os.path.join(tmp, "held")
    pictures(data, [(300, 260), (260, 300), (256, 256), (400, 300), (64, 64), (100, 80)], 1)
    pictures(small, [(32, 32)] * 3, 2)
    pictures(held, [(256, 256)] * 3, 3)
    cache = ["--data-dir", os.path.join(tmp, "cache")]

    rc, _, err = ddpm("--model", "paper256", "--run", os.path.join(tmp, "r0"))
    check("paper256 on CIFAR-10 (32x32): refused in one line, exit 2, pointing to a folder",
          one_line(rc, err, "--data DIR", 2) and not os.path.exists(os.path.join(tmp, "r0")), f"exit {rc}: {err}")
    rc, _, err = ddpm("--model", "paper256", "--img", "64", "--data", data, *cache, "--run", os.path.join(tmp, "r0"))
    check("paper256 at --img 64: refused in one line, exit 2", one_line(rc, err, "256x256", 2), f"exit {rc}: {err}")
    rc, _, err = ddpm("--model", "paper256", "--batch", "4096", "--data", data, *cache, "--run", os.path.join(tmp, "r0"))
    check("a batch that cannot fit in memory (4096 at 256x256): one line naming --accumulate, exit 1, "
          "before any data is read or folder made",
          one_line(rc, err, "--accumulate", 1) and "GiB" in err and not os.path.exists(os.path.join(tmp, "r0"))
          and not os.path.exists(os.path.join(tmp, "cache")), f"exit {rc}: {err}")

    run_dir = os.path.join(tmp, "run")
    rc, _, err = ddpm(*NARROW, "--data", data, *cache, "--run", run_dir, "--batch", "2", "--accumulate", "2",
                      "--steps", "3", "--sample-n", "0", "--seed", "5")
    plan = next((l for l in err.splitlines() if l.startswith("plan: ")), "")
    ckpt = os.path.join(run_dir, "model.ckpt")
    check("training the reduced-width paper256 on a folder at 256x256 (micro-batches of 1): the plan says "
          "256x256 and lr 2e-05",
          rc == 0 and os.path.exists(ckpt) and "256x256" in plan and "lr 2e-05" in plan and "enlarged" in err,
          f"exit {rc}: {err[-500:]}")
    if rc != 0:
        return

    png, npz = os.path.join(tmp, "s.png"), os.path.join(tmp, "s.npz")
    rc, out, err = ddpm("sample", "--checkpoint", ckpt, "-n", "2", "--sampler", "ddim", "--steps", "3", "--out", png,
                        "--npz", npz, "--trace")
    shape = np.load(npz)["arr_0"].shape if rc == 0 and os.path.exists(npz) else None
    trace = [f for f in os.listdir(tmp) if "trace" in f or "x0_hat" in f or "xt" in f]
    check("sample on it: a PNG of 256x256 tiles, (2, 256, 256, 3) uint8 in the .npz, and --trace's files",
          shape == (2, 256, 256, 3) and os.path.exists(png) and min(png_size(png)) >= 256 and trace,
          f"exit {rc}: {err[-300:]}; shape {shape}; {os.listdir(tmp)}")
    s = err.splitlines()
    check("sample's progress at 256x256 gives the time per step", any(re.search(r"step 3/3 +[0-9.]+ m?s each", l)
                                                                    for l in s), err[-300:])

    rc, _, err = ddpm("reconstruct", "--checkpoint", ckpt, "--data", held, *cache, "--index", "0", "--t", "3,2",
                      "-k", "2", "--out", os.path.join(tmp, "rec.png"))
    check("reconstruct on it, from a held-out folder of 256x256 pictures",
          rc == 0 and os.path.exists(os.path.join(tmp, "rec.png")), f"exit {rc}: {err[-300:]}")
    rc, _, err = ddpm("interpolate", "--checkpoint", ckpt, "--data", held, *cache, "--index", "0,1", "--t", "3",
                      "--lambdas", "3", "--out", os.path.join(tmp, "int.png"))
    check("interpolate on it", rc == 0 and os.path.exists(os.path.join(tmp, "int.png")), f"exit {rc}: {err[-300:]}")

    rc, _, err = ddpm("bpd", "--checkpoint", ckpt, "--data", small, *cache, "-n", "2", "--steps", "4")
    check("the 256x256 checkpoint evaluated on a folder of 32x32 pictures: one line, exit 1",
          one_line(rc, err, "smaller than", 1), f"exit {rc}: {err}")
    rc, _, err = ddpm("bpd", "--checkpoint", ckpt, "--data", "fashion-mnist", "-n", "2", "--steps", "4")
    check("the 256x256 checkpoint evaluated on Fashion-MNIST: one line, exit 1, naming both sizes",
          one_line(rc, err, "256x256", 1) and "32x32" in err, f"exit {rc}: {err}")
    rc, _, err = ddpm(*NARROW[:2], "--data", data, *cache, "--run", run_dir, "--resume", "--steps", "4",
                      "--sample-n", "0")
    last = err.splitlines()[-1] if err else ""
    check("--resume --model paper256 of a reduced-width run: refused, the last line naming another network",
          0 < rc < 128 and last.startswith("ddpm: ") and "another network" in last, f"exit {rc}: {err}")


if __name__ == "__main__":
    sys.exit(main())
