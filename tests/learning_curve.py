#!/usr/bin/python3
"""Evaluate checkpoints along a run, and plot the learning curve (README, issue 14).

  learning_curve.py eval CKPT [CKPT ...] --csv FILE [--label NAME] [--bpd-n 256]
                    [--t-samples 50] [--score-n 1000] [--sampler ddim|ddpm|dpm++] [--steps 25] [--sigma beta_tilde]
                    [--seed 1] [--threads 1] [--ddpm PROGRAM]
  learning_curve.py plot --csv FILE --out PNG [--log NAME=LOG.csv ...]

`eval` appends one row per checkpoint to the CSV: its training step, the test bound in
bits/dim with its standard error (`./ddpm bpd -n BPD_N --t-samples K`: the sum over t
estimated from K stratified t per image, unbiased; the error covers images and t), and
FID-FMNIST (tests/fid_fmnist.py; never FID) with its bootstrap spread, of SCORE_N samples drawn by
`./ddpm sample --npz` with the named sampler and steps. A row is written when both are
done, so an interrupted evaluation loses only its current checkpoint; the bound's output
is kept beside the checkpoint as CKPT.bpd.txt.
With --score-n 0 only the bound is evaluated, with --bpd-n 0 only the score. `plot` draws the bound and the score against the step, and the runs' training losses.
"""
import argparse, csv, os, re, struct, subprocess, sys, tempfile, time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FIELDS = ["label", "checkpoint", "step", "bpd", "bpd_se", "bpd_n", "t_samples", "fid_fmnist", "fid_sd",
          "score_n", "sampler", "sample_steps", "seed", "seconds_bpd", "seconds_sample"]


def fail(msg):
    print(f"learning_curve.py: {msg}", file=sys.stderr)
    sys.exit(1)


def run(cmd):
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.time()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode:
        fail(f"{' '.join(map(str, cmd))} exited with {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout, time.time() - t0


def checkpoint_step(path):
    with open(path, "rb") as f:
        h = f.read(160)
    if len(h) < 160 or h[:8] != b"DDPMCKPT":
        fail(f"{path} is not a ddpm.c checkpoint")
    return struct.unpack_from("<Q", h, 112)[0]   # CheckpointHeader.step (ddpm.c section 20)


def cmd_eval(a):
    ddpm = os.path.abspath(a.ddpm) if a.ddpm else os.path.join(ROOT, "ddpm")
    th = ["--threads", a.threads]
    new = not os.path.exists(a.csv)
    for ckpt in a.checkpoints:
        step = checkpoint_step(ckpt)
        total, se, s_bpd = float("nan"), float("nan"), 0
        if a.bpd_n:
            out, s_bpd = run([ddpm, "bpd", "--checkpoint", ckpt, "-n", a.bpd_n, "--t-samples", a.t_samples,
                              "--seed", a.seed, *th])
            with open(ckpt + ".bpd.txt", "w") as f:   # the bound's whole output, beside the checkpoint
                f.write(out)
            total = float(re.search(r"total \(NLL <=\)\s+([\d.]+)", out).group(1))
            se = float(re.search(r"std. error\s+([\d.]+)", out).group(1))
        fid, fid_sd, s_sample = None, None, 0
        if a.score_n:
            with tempfile.TemporaryDirectory() as tmp:
                npz = os.path.join(tmp, "s.npz")
                _, s_sample = run([ddpm, "sample", "--checkpoint", ckpt, "-n", a.score_n, "--sampler", a.sampler,
                                   "--steps", a.steps, "--seed", a.seed, "--out", os.path.join(tmp, "s.png"),
                                   "--npz", npz, *th, *(["--sigma", a.sigma] if a.sigma else [])])
                out, _ = run([sys.executable, os.path.join(ROOT, "tests", "fid_fmnist.py"), "score", npz,
                              "--bootstrap", "50"])
            fid = float(re.search(r"FID-FMNIST\s+([\d.]+)", out).group(1))
            fid_sd = float(re.search(r"bootstrap sd\s+([\d.]+)", out).group(1))
        row = dict(label=a.label, checkpoint=ckpt, step=step, bpd=f"{total:.4f}", bpd_se=f"{se:.4f}",
                   bpd_n=a.bpd_n, t_samples=a.t_samples, fid_fmnist="" if fid is None else f"{fid:.3f}",
                   fid_sd="" if fid is None else f"{fid_sd:.3f}", score_n=a.score_n,
                   sampler=a.sampler + (f" sigma {a.sigma}" if a.sigma else ""), sample_steps=a.steps, seed=a.seed, seconds_bpd=f"{s_bpd:.0f}",
                   seconds_sample=f"{s_sample:.0f}")
        with open(a.csv, "a", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            if new:
                w.writeheader()
                new = False
            w.writerow(row)
        print(f"{a.label} step {step}: bound {total:.3f} +- {se:.3f} bits/dim ({a.bpd_n} images), "
              + (f"FID-FMNIST {fid:.2f} +- {fid_sd:.2f} ({a.score_n} samples, {a.sampler} {a.steps} steps) " if a.score_n else "")
              + f"[{s_bpd:.0f} s + {s_sample:.0f} s]", flush=True)


def cmd_plot(a):
    import numpy as np
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(a.csv)))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: int(r["step"]))
        st = [int(r["step"]) for r in rs]
        ax[0].errorbar(st, [float(r["bpd"]) for r in rs], yerr=[2 * float(r["bpd_se"]) for r in rs],
                       marker="o", capsize=3, label=label)
        sc = [(int(r["step"]), float(r["fid_fmnist"])) for r in rs if r["fid_fmnist"]]
        ax[1].plot(*zip(*sc), marker="o", label=label)
    r0 = rows[0]
    ax[0].set_title(f"test bound, Eq. (5) (bits/dim; {r0['bpd_n']} images, bars 2 s.e.)")
    ax[1].set_title(f"FID-FMNIST ({r0['score_n']} samples, {r0['sampler']} {r0['sample_steps']} steps)")
    ax[1].set_yscale("log")
    for spec in a.log or []:
        name, path = spec.split("=", 1)
        log = np.genfromtxt(path, delimiter=",", names=True)
        w = 100
        c = np.cumsum(np.insert(log["loss"], 0, 0))
        ax[2].plot(log["step"][w - 1:], (c[w:] - c[:-w]) / w, label=name)
    ax[2].set_title("training loss, Eq. (14) (running mean of 100 steps)")
    ax[2].set_yscale("log")
    for x in ax:
        x.set_xlabel("training step (batch 32)")
        x.grid(alpha=0.3)
        x.legend()
    plt.tight_layout()
    plt.savefig(a.out, dpi=80)
    print(f"wrote {a.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("checkpoints", nargs="+")
    e.add_argument("--csv", required=True)
    e.add_argument("--label", default="ddpm.c")
    e.add_argument("--bpd-n", type=int, default=256)
    e.add_argument("--t-samples", type=int, default=50)
    e.add_argument("--score-n", type=int, default=1000)
    e.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpm++"])
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--sigma", choices=["beta", "beta_tilde"], help="ddpm's sigma_t^2 (default: the checkpoint's)")
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--ddpm", help="the program to run (default ./ddpm; build/ddpm_direct: no Winograd)")
    p = sub.add_parser("plot")
    p.add_argument("--csv", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--log", action="append")
    a = ap.parse_args()
    for c in getattr(a, "checkpoints", []):
        if not os.path.isfile(c):
            fail(f"{c} not found")
    (cmd_eval if a.cmd == "eval" else cmd_plot)(a)


if __name__ == "__main__":
    main()
