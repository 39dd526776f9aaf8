#!/usr/bin/python3
"""PyTorch side of the ddpm.c CPU benchmark.

Times one DDPM training step (Algorithm 1 of Ho et al. 2020) and one
sampling step (Algorithm 2) of the reference U-Net in tests/reference.py,
on the CPU, and prints ONE line of JSON to stdout.  `./ddpm bench` prints
the same keys for the C implementation, and tests/bench_table.py puts the
two side by side.

Usage:
    /usr/bin/python3 tests/bench_torch.py --model tiny --batch 32 \
        [--steps 10] [--warmup 2] [--threads N] [--dropout 0.1]
    /usr/bin/python3 tests/bench_torch.py --ceiling [--steps 10]

Each run is its own process, so max_rss_mb (the peak resident set size,
ru_maxrss) belongs to this benchmark alone.  Every timed step is recorded;
the headline numbers are medians, because the machine is shared and noisy.

FLOP counting rule (ddpm.c counts the same way):
  * only multiply-adds of convolutions, dense layers and the two attention
    matmuls are counted, at 2 FLOPs per multiply-add; normalisation,
    activations, bias adds, softmax and the optimiser are ignored;
  * conv:   2 * C_out * H_out * W_out * (C_in / groups) * k_h * k_w per image
    dense:  2 * in * out per row
    attention (per AttnBlock, N = H*W positions, C channels):
            2 * N*N*C for q^T k  plus  2 * N*N*C for w v   per image;
  * a training step counts as 3 forwards: the forward pass, plus two GEMMs
    of the same size per layer in the backward pass (gradient w.r.t. the
    input and gradient w.r.t. the weights).
"""

import argparse
import ctypes
import json
import math
import os
import re
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402  (the PyTorch U-Net that ddpm.c is checked against)

T = 1000                       # diffusion steps
BETA_1, BETA_T = 1e-4, 0.02    # linear beta schedule (§4 of the paper)
LR, ADAM_BETAS, ADAM_EPS = 2e-4, (0.9, 0.999), 1e-8
GRAD_CLIP = 1.0
EMA_DECAY = 0.9999
SAMPLE_T = 500                 # the fixed timestep of the timed sampling step
CEILING_N = 2048               # size of the square matmul of --ceiling


# ---------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------

class Schedule:
    """beta_t, alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s for
    t = 0..T-1 (0-based), computed in float64 and stored as float32."""

    def __init__(self):
        betas = torch.linspace(BETA_1, BETA_T, T, dtype=torch.float64)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        f32 = lambda v: v.to(torch.float32)
        self.betas = f32(betas)
        self.sqrt_abar = f32(abar.sqrt())
        self.sqrt_1m_abar = f32((1.0 - abar).sqrt())
        self.recip_sqrt_alpha = f32(1.0 / alphas.sqrt())
        self.sigma = f32(betas.sqrt())          # sigma_t^2 = beta_t (§3.2)


# ---------------------------------------------------------------------------
# The two timed steps
# ---------------------------------------------------------------------------

def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * p, in place, for every parameter.
    The _foreach_ kernels do all tensors in one call when available."""
    with torch.no_grad():
        if hasattr(torch, "_foreach_mul_"):
            torch._foreach_mul_(ema_params, decay)
            torch._foreach_add_(ema_params, params, alpha=1.0 - decay)
        else:
            for e, p in zip(ema_params, params):
                e.mul_(decay).add_(p, alpha=1.0 - decay)


def train_step(model, params, ema_params, opt, x0, sched, gen):
    """One step of Algorithm 1 plus the optimiser, clipping and EMA, as in
    ddpm.c.  x0 is a fixed batch (no data loading is timed)."""
    B = x0.shape[0]
    t = torch.randint(0, T, (B,), generator=gen)             # t ~ U{0..T-1}
    eps = torch.randn(x0.shape, generator=gen)               # eps ~ N(0, I)
    a = sched.sqrt_abar[t].view(B, 1, 1, 1)
    s = sched.sqrt_1m_abar[t].view(B, 1, 1, 1)
    x_t = a * x0 + s * eps                                   # q(x_t | x_0)
    loss = torch.mean((eps - model(x_t, t.to(torch.float32))) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    opt.step()
    ema_update(ema_params, params, EMA_DECAY)
    return loss.item()


def sample_step(model, x_t, t_vec, sched, gen):
    """One step of Algorithm 2 at t = SAMPLE_T for the whole batch:
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z."""
    with torch.no_grad():
        eps = model(x_t, t_vec)
        z = torch.randn(x_t.shape, generator=gen)
        c = sched.betas[SAMPLE_T] / sched.sqrt_1m_abar[SAMPLE_T]
        return sched.recip_sqrt_alpha[SAMPLE_T] * (x_t - c * eps) + sched.sigma[SAMPLE_T] * z


def time_steps(fn, warmup, steps):
    """Run fn warmup times untimed, then steps times; returns the ms of each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# ---------------------------------------------------------------------------
# FLOP count (see the rule in the module docstring)
# ---------------------------------------------------------------------------

def forward_flops(model, config, batch):
    """FLOPs of one forward pass at this batch size, found with forward hooks.
    Every counted layer scales linearly with the batch (the time embedding
    has one row per image), so one image is run and the count multiplied."""
    total = 0

    def conv_hook(mod, inp, out):
        nonlocal total
        _, c_out, h_out, w_out = out.shape
        k_h, k_w = mod.kernel_size
        total += 2 * c_out * h_out * w_out * (mod.in_channels // mod.groups) * k_h * k_w

    def linear_hook(mod, inp, out):
        nonlocal total
        rows = inp[0].numel() // mod.in_features
        total += 2 * mod.in_features * mod.out_features * rows

    def attn_hook(mod, inp, out):
        nonlocal total
        _, c, h, w = inp[0].shape
        n = h * w
        total += 2 * (2 * n * n * c)          # q^T k and w v, 2*N*N*C each

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, reference.AttnBlock):
            hooks.append(m.register_forward_hook(attn_hook))
    img = int(config.get("img", 32))
    with torch.no_grad():
        model(torch.zeros(1, int(config["in_ch"]), img, img), torch.zeros(1))
    for h in hooks:
        h.remove()
    return total * batch


# ---------------------------------------------------------------------------
# Which BLAS is this torch using?
# ---------------------------------------------------------------------------

def mapped_files():
    """(start, end, path) of every file mapped into this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/"):
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                out.append((lo, hi, parts[5]))
    return out


def loaded(name):
    """A ctypes handle on an already-loaded library (None: the global scope)."""
    return ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)


def sgemm_file():
    """The real file of the sgemm_ that torch's matmuls call.

    A symbol that libtorch_cpu uses is bound by the dynamic linker to the
    first definition found in (1) the global scope: the python executable,
    its dependencies and any LD_PRELOAD library, then (2) libtorch_cpu's own
    dependency tree in load order, where its NEEDED entry libblas.so.3 sits.
    dlsym() on the dlopen(NULL) handle searches (1); dlsym() on a handle of
    libtorch_cpu searches (2).  The address found is then looked up in
    /proc/self/maps, which names the real file behind any symlinks."""
    maps = mapped_files()
    torch_cpu = next((p for _, _, p in maps
                      if os.path.basename(p).startswith("libtorch_cpu")), None)
    for scope in (None, torch_cpu):
        try:
            addr = ctypes.cast(loaded(scope).sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError, TypeError):
            continue                     # not in this scope: try the next
        return next((p for lo, hi, p in maps if lo <= addr < hi), "?")
    return "?"


def blas_info():
    """Describe the BLAS behind torch's float32 matmuls.

    Debian's torch is built with BLAS_INFO=generic: it calls sgemm_ from
    whatever library the dynamic loader found for the soname libblas.so.3
    (Debian's alternatives system picks between the reference BLAS and
    OpenBLAS; LD_LIBRARY_PATH or LD_PRELOAD can override it).  Convolutions
    mostly go through oneDNN (mkldnn) instead, which has its own kernels."""
    a = torch.randn(64, 64)
    torch.mm(a, a)                                   # make sure BLAS is loaded
    path, version = sgemm_file(), ""
    if "openblas" in path.lower():                   # OpenBLAS reports its build
        for name in (path, "libopenblas.so.0"):
            try:
                get = loaded(name).openblas_get_config
                get.restype = ctypes.c_char_p
                version = get().decode().strip()
                break
            except (OSError, AttributeError):
                pass
    elif "/blas/" in path:
        version = "reference (netlib) BLAS"
    blas_flag = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return {
        "blas": f"{path} ({version})" if version else path,
        "blas_info": blas_flag.group(1) if blas_flag else "?",
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }


def max_rss_mb():
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def run_ceiling(args, threads):
    """Median GFLOP/s of a CEILING_N^3 float32 matmul: the practical fp32
    peak of this machine through torch's BLAS."""
    n = CEILING_N
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    times = time_steps(lambda: torch.mm(a, b, out=c), args.warmup, args.steps)
    flop = 2.0 * n * n * n
    gflops = [flop / (ms * 1e-3) / 1e9 for ms in times]
    out = {"impl": "pytorch", "ceiling_gflops": round(statistics.median(gflops), 2),
           "ceiling_gflops_all": [round(g, 2) for g in gflops],
           "matmul_n": n, "threads": threads}
    out.update(blas_info())
    out["torch"] = torch.__version__
    return out


def run_model(args, threads):
    if args.model not in reference.PRESETS:
        raise SystemExit(f"error: unknown model {args.model} "
                         f"(have {', '.join(reference.PRESETS)})")
    config = dict(reference.PRESETS[args.model])
    # ddpm.c trains every preset with the paper's dropout 0.1; reference.py's
    # compact presets say 0.0 (it only ever runs the model in eval mode), so
    # the benchmark sets the rate explicitly to do the same work as the C side.
    if args.dropout is None:
        args.dropout = 0.0 if args.model == "paper256" else 0.1
    config["dropout"] = args.dropout
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    sched = Schedule()

    model = reference.build_model(config)
    params = [p for p in model.parameters()]
    ema_params = [p.detach().clone() for p in params]      # the EMA copy
    try:
        opt = torch.optim.Adam(params, lr=LR, betas=ADAM_BETAS, eps=ADAM_EPS,
                               foreach=True)
    except TypeError:                                      # older torch
        opt = torch.optim.Adam(params, lr=LR, betas=ADAM_BETAS, eps=ADAM_EPS)
    n_params = sum(p.numel() for p in params)
    fwd_flops = forward_flops(model, config, args.batch)

    img, C, B = int(config.get("img", 32)), int(config["in_ch"]), args.batch
    x0 = torch.rand(B, C, img, img, generator=gen) * 2 - 1   # fixed "data" in [-1, 1]

    model.train()                                          # dropout on
    train_ms = time_steps(
        lambda: train_step(model, params, ema_params, opt, x0, sched, gen),
        args.warmup, args.steps)

    model.eval()                                           # dropout off
    x_t = torch.randn(B, C, img, img, generator=gen)
    t_vec = torch.full((B,), float(SAMPLE_T))
    sample_ms = time_steps(lambda: sample_step(model, x_t, t_vec, sched, gen),
                           args.warmup, args.steps)

    out = {
        "impl": "pytorch", "model": args.model, "batch": B, "threads": threads,
        "params": n_params,
        "train_ms": round(statistics.median(train_ms), 3),
        "sample_ms": round(statistics.median(sample_ms), 3),
        "train_ms_all": [round(v, 3) for v in train_ms],
        "sample_ms_all": [round(v, 3) for v in sample_ms],
        "fwd_gflop": round(fwd_flops / 1e9, 6),
        "max_rss_mb": round(max_rss_mb(), 1),
        "dropout": args.dropout,
    }
    out.update(blas_info())
    out["torch"] = torch.__version__
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, small or paper")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dropout", type=float, default=None,
                    help="dropout rate in training (default ddpm.c's: 0.1, paper256 0)")
    ap.add_argument("--ceiling", action="store_true",
                    help=f"time a {CEILING_N}^3 float32 matmul instead")
    args = ap.parse_args()
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--batch, --steps and --threads must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    out = run_ceiling(args, threads) if args.ceiling else run_model(args, threads)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
