#!/usr/bin/python3
"""Train tests/reference.py's U-Net in PyTorch with ddpm.c's training protocol.

ddpm.c's gradients are checked against autograd one step at a time (reference.py).
This script checks the rest of the training loop, which a gradient test cannot: it
trains the same network with the same protocol in PyTorch, so that both models can be
evaluated with the same tools (`./ddpm bpd`, `./ddpm sample --npz`, tests/fid_fmnist.py).
Everything here is written from the paper and the official code's conventions, not from
ddpm.c:

  - data: Fashion-MNIST's 60,000 training images, 28x28 centred in 32x32 zeros, scaled
    to [-1, 1]; each batch drawn uniformly with replacement, each image flipped
    horizontally with probability 1/2 (Appendix B's flips);
  - Algorithm 1: t uniform over {1..T} (0-based here), eps ~ N(0, I), x_t of Eq. (4),
    the loss L_simple of Eq. (14), the mean over all elements;
  - the network: reference.py's DDPMUNet with dropout (0.1 in the tiny preset) in
    training, the official initialisation (variance scaling, fan_avg, uniform; biases
    zero; the last convolution of each residual block, of each attention block and of
    the output at scale 1e-10);
  - the optimiser: Adam as TensorFlow writes it (lr_t = lr sqrt(1 - b2^t) / (1 - b1^t),
    eps added to sqrt(v)), betas 0.9 and 0.999, eps 1e-8; a linear warmup of the
    learning rate; the global gradient norm clipped; an EMA of the weights with decay
    min(d, (1 + step) / (10 + step)).

  train_torch.py --out DIR --steps N [--save-at 1000,2000,3000] [--batch 32] [--lr 5e-4]
                 [--warmup 200] [--ema-decay 0.999] [--grad-clip 1] [--dropout 0.1]
                 [--seed 0] [--threads 1] [--no-flip] [--resume]
  train_torch.py --selftest     (make test: 3 steps, resume, and ./ddpm import/export)

It writes DIR/log.csv (the columns of ddpm.c's log), DIR/state.pt (everything needed to
--resume, at every save point and on Ctrl-C) and, at each save point, DIR/step_NNNNN.ref:
the EMA weights as a reference.py exchange file, which `./ddpm import` turns into a
ddpm.c checkpoint. Its random numbers are PyTorch's, not ddpm.c's: the two runs are
independent draws of the same experiment, to be compared within standard errors.
"""
import argparse, math, os, shutil, signal, subprocess, sys, tempfile, time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import build_model, write_exchange, read_exchange, config_to_records  # noqa: E402
from fid_fmnist import fashion_mnist  # noqa: E402

CONFIG = dict(in_ch=1, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16],
              groups=8, img=32)   # ddpm.c's tiny preset on Fashion-MNIST


def fail(msg):
    print(f"train_torch.py: {msg}", file=sys.stderr)
    sys.exit(1)


def official_init(model, gen):
    """Variance scaling (scale 1, fan_avg, uniform) for every weight; biases 0, GroupNorm
    1 and 0; scale 1e-10 for the layers the official code zeroes in effect."""
    small = lambda name: name.endswith(("conv2.weight", "proj_out.weight")) or name == "conv_out.weight"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
                continue
            recept = p[0, 0].numel() if p.dim() == 4 else 1
            fan_in, fan_out = p.shape[1] * recept, p.shape[0] * recept
            bound = math.sqrt(3.0 * (1e-10 if small(name) else 1.0) / ((fan_in + fan_out) / 2))
            p.uniform_(-bound, bound, generator=gen)


def linear_abar(T=1000):
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas)).float()


def save_exchange(path, ema, step):
    recs = config_to_records(CONFIG)
    recs["config.objective"] = np.zeros(3, np.float32)   # eps, fixedlarge, simple
    recs["config.dropout"] = np.array([DROPOUT], np.float32)
    recs["meta.step"] = np.array([step], np.float32)
    for name, p in ema.items():
        recs["param." + name] = p.numpy()
    write_exchange(path + ".tmp", recs)
    os.replace(path + ".tmp", path)


def selftest():
    """Resume continues bit for bit; ./ddpm imports the EMA weights and exports them back
    unchanged; the imported checkpoint evaluates. Prints "N passed, N failed"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ddpm = os.path.join(root, "ddpm")
    tmp = tempfile.mkdtemp(prefix="train_torch.")
    me = [sys.executable, os.path.abspath(__file__), "--batch", "2", "--warmup", "2"]
    results = []

    def check(name, ok, detail=""):
        results.append(ok)
        print(("PASS " if ok else "FAIL ") + name + ("" if ok else ": " + detail), flush=True)

    def run(*args):
        r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=root)
        return r.returncode, (r.stderr.strip().splitlines() or [""])[-1]

    a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    rc1 = run(*me, "--out", a, "--steps", "4", "--save-at", "2")
    rc2 = run(*me, "--out", b, "--steps", "2")
    rc3 = run(*me, "--out", b, "--steps", "4", "--resume")
    rows = lambda d: open(os.path.join(d, "log.csv")).read().splitlines()
    same = all(r[0] == 0 for r in (rc1, rc2, rc3)) and \
        [r.rsplit(",", 1)[0] for r in rows(a)] == [r.rsplit(",", 1)[0] for r in rows(b)]
    check("4 steps, and 2 steps plus --resume to 4: the same losses, lr and gradient norms", same,
          f"{rc1} {rc2} {rc3}")
    if same:
        ea, eb = (read_exchange(os.path.join(d, "step_00004.ref")) for d in (a, b))
        check("... and the same EMA weights", all(np.array_equal(ea[k], eb[k]) for k in ea))
        ref, ckpt, back = os.path.join(a, "step_00004.ref"), os.path.join(tmp, "imp.ckpt"), os.path.join(tmp, "back.ref")
        r1 = run(ddpm, "import", "--weights", ref, "--out", ckpt, "--batch", "2", "--threads", "1")
        r2 = run(ddpm, "export", "--checkpoint", ckpt, "--out", back, "--threads", "1")
        ok = r1[0] == 0 and r2[0] == 0
        if ok:
            eb = read_exchange(back)
            params = [k for k in ea if k.startswith("param.")]
            ok = len(params) == 182 and sorted(params) == sorted(k for k in eb if k.startswith("param.")) and \
                all(np.array_equal(ea[k], eb[k]) for k in params) and eb["meta.step"][0] == 4
        check("./ddpm import, then export: the 182 EMA tensors unchanged, step 4", ok, f"{r1} {r2}")
        r3 = run(ddpm, "bpd", "--checkpoint", ckpt, "-n", "2", "--t-samples", "5", "--threads", "1")
        check("the imported checkpoint evaluates (bpd)", r3[0] == 0, str(r3))
    shutil.rmtree(tmp)
    n_fail = results.count(False)
    print(f"{len(results) - n_fail} passed, {n_fail} failed")
    return 1 if n_fail else 0


DROPOUT = 0.1


def main():
    global DROPOUT
    if sys.argv[1:] == ["--selftest"]:
        return selftest()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-at", default="")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    try:
        save_at = sorted({int(s) for s in a.save_at.split(",") if s} | {a.steps})
    except ValueError:
        fail(f"--save-at {a.save_at}: expected step numbers separated by commas")
    if a.steps < 1 or a.batch < 1 or a.warmup < 0 or not (0 <= a.dropout < 1):
        fail("--steps and --batch must be positive, --warmup >= 0, --dropout in [0, 1)")
    torch.set_num_threads(a.threads)
    DROPOUT = a.dropout
    os.makedirs(a.out, exist_ok=True)
    state_path, log_path = os.path.join(a.out, "state.pt"), os.path.join(a.out, "log.csv")

    train, _ = fashion_mnist("train")
    data = torch.from_numpy(train).float().div(127.5).sub(1.0).unsqueeze(1)   # (N, 1, 32, 32)
    abar = linear_abar()
    model = build_model(dict(CONFIG, dropout=a.dropout))
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(a.seed)
    official_init(model, gen)
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    ema = {k: p.detach().clone() for k, p in params.items()}
    step = 0
    if a.resume:
        if not os.path.exists(state_path):
            fail(f"--resume: {state_path} not found; drop --resume to start a new run")
        st = torch.load(state_path)
        model.load_state_dict(st["model"])
        m, v, ema, step = st["m"], st["v"], st["ema"], st["step"]
        gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        with open(log_path) as f:   # drop rows past the state, as ddpm.c does on --resume
            rows = [r for r in f if not r[0].isdigit() or int(r.split(",")[0]) <= step]
        with open(log_path, "w") as f:
            f.writelines(rows)
    elif os.path.exists(state_path):
        fail(f"{a.out} already holds a run; add --resume, or pass another --out")
    else:
        torch.manual_seed(a.seed)
        with open(log_path, "w") as f:
            f.write("step,loss,lr,grad_norm,images_per_s\n")

    def save_state():
        torch.save(dict(model=model.state_dict(), m=m, v=v, ema=ema, step=step, gen=gen.get_state(),
                        torch_rng=torch.get_rng_state(), args=vars(a)), state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.append(s))
    b1, b2, adam_eps = 0.9, 0.999, 1e-8
    log = open(log_path, "a", buffering=1)
    t0, first = time.time(), step
    model.train()
    while step < a.steps and not stop:
        ts = time.time()
        idx = torch.randint(0, data.shape[0], (a.batch,), generator=gen)
        x0 = data[idx]
        if not a.no_flip:
            flip = torch.rand(a.batch, generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        t = torch.randint(0, 1000, (a.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        ab = abar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps                      # Eq. (4)
        loss = F.mse_loss(model(x_t, t.float()), eps)                      # Eq. (14)
        if not torch.isfinite(loss):
            fail(f"the loss became {loss.item()} at step {step + 1}; {state_path} is the last good state")
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params.values()))
            scale = a.grad_clip / norm if norm > a.grad_clip else 1.0
            step += 1
            lr = a.lr * min(1.0, step / a.warmup) if a.warmup > 0 else a.lr
            lr_t = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
            d = min(a.ema_decay, (1 + step) / (10 + step))
            for k, p in params.items():
                g = p.grad * scale
                m[k].mul_(b1).add_(g, alpha=1 - b1)
                v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
                p.sub_(lr_t * m[k] / (v[k].sqrt() + adam_eps))
                ema[k].mul_(d).add_(p, alpha=1 - d)
        ips = a.batch / (time.time() - ts)
        log.write(f"{step},{loss.item():.6f},{lr:.6g},{norm:.6f},{ips:.2f}\n")
        if step % 100 == 0 or step == a.steps:
            el = time.time() - t0
            print(f"step {step}/{a.steps} loss {loss.item():.4f} lr {lr:.3g} grad_norm {norm:.3f} "
                  f"{(step - first) * a.batch / el:.1f} img/s elapsed {el:.0f}s "
                  f"ETA {el / (step - first) * (a.steps - step):.0f}s", file=sys.stderr, flush=True)
        if step in save_at:
            save_state()
            path = os.path.join(a.out, f"step_{step:05d}.ref")
            save_exchange(path, {k: e.detach() for k, e in ema.items()}, step)
            print(f"saved {path} (EMA weights) and {state_path}", file=sys.stderr, flush=True)
    log.close()
    if stop:
        save_state()
        print(f"interrupted at step {step}; {state_path} saved; continue with --resume", file=sys.stderr)
        return 128 + stop[0]
    return 0


if __name__ == "__main__":
    sys.exit(main())
