#!/usr/bin/python3
"""Independent PyTorch reference for the DDPM U-Net, used to check ddpm.c.

The network is the CIFAR-10 noise-prediction model eps_theta(x_t, t) of
Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (2020):
a PixelCNN++-style U-Net with group normalisation, sinusoidal time embedding
added inside every residual block, and self-attention at 16x16 (Appendix B).
It is trained with the simplified objective L_simple (§3.4, Algorithm 1):

    L_simple = mean( (eps - eps_theta(x_t, t))^2 )

The C program writes an "exchange file" holding its configuration, random
weights, the inputs, its output, loss and gradients.  This script rebuilds
the same network in PyTorch, runs it in float32 and float64 (the float64 run
is the ground truth), and compares.

Usage:
    /usr/bin/python3 tests/reference.py FILE [FILE...]
    /usr/bin/python3 tests/reference.py --self-test [--preset NAME] [--batch N]

Exchange file format (little-endian):
    8 bytes magic "DDPMREF1", int32 n_records, then n_records records of
    int32 name_len, name (ASCII), int32 ndim, int32 shape[ndim],
    float32 data[prod(shape)] in C order.

The module can be imported (e.g. by a benchmark script) without side effects:
it exposes DDPMUNet, build_model(config) and PRESETS.
"""

import copy
import math
import os
import struct
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Tolerances.  They come from the project's issue: float32 has a unit
# roundoff of ~6e-8, and errors grow with network depth and with the length
# of the sums (convolutions, attention, batch/spatial reductions in the
# backward pass), so gradients get a looser bound than the forward pass.
# A tensor passes when its C-vs-float64 relative error (normwise, see
# rel_err) is below the bound.
# ---------------------------------------------------------------------------
FORWARD_TOL = 1e-5   # eps_theta and loss
GRAD_TOL = 1e-4      # every d loss / d param
TINY = 1e-30         # guards the relative error against all-zero references

MAGIC = b"DDPMREF1"

# Network configurations.  "paper" is the official CIFAR-10 model (35.7M
# parameters, Appendix B); "tiny" and "small" are cheap variants for tests.
PRESETS = {
    "paper": dict(in_ch=3, ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2,
                  attn_resolutions=[16], groups=32, img=32, dropout=0.1),
    "tiny": dict(in_ch=3, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1,
                 attn_resolutions=[16], groups=8, img=32, dropout=0.0),
    "small": dict(in_ch=3, ch=64, ch_mult=[1, 2, 2], num_res_blocks=1,
                  attn_resolutions=[16], groups=32, img=32, dropout=0.0),
    # the LSUN and CelebA-HQ model (the official unet2d16b2c112244, 113,673,219 parameters)
    "paper256": dict(in_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2,
                     attn_resolutions=[16], groups=32, img=256, dropout=0.0),
}
PAPER_PARAM_COUNT = 35_746_307


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def group_norm(channels, groups):
    """GroupNorm as in the official TensorFlow code (epsilon 1e-6)."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the timesteps, as in the Transformer (§4).

    t: (B,) float tensor of 0-based timesteps.  Returns (B, dim):
    [sin(t * f_0), ..., sin(t * f_{h-1}), cos(t * f_0), ..., cos(t * f_{h-1})]
    with h = dim // 2 and f_i = 10000^(-i / (h - 1)).
    """
    half = dim // 2
    i = torch.arange(half, dtype=t.dtype, device=t.device)
    freqs = torch.exp(-math.log(10000.0) * i / (half - 1))
    args = t[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TimeEmbedding(nn.Module):
    """Two dense layers on top of the sinusoidal embedding: ch -> 4ch -> 4ch."""

    def __init__(self, ch):
        super().__init__()
        self.ch = ch
        self.dense0 = nn.Linear(ch, 4 * ch)
        self.dense1 = nn.Linear(4 * ch, 4 * ch)

    def forward(self, t):
        emb = timestep_embedding(t, self.ch)
        return self.dense1(F.silu(self.dense0(emb)))


class ResBlock(nn.Module):
    """Residual block (Appendix B: two conv layers per block, as in
    PixelCNN++ / Wide ResNet) with the time embedding added in between."""

    def __init__(self, in_ch, out_ch, temb_ch, groups, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)   # inactive: we always run eval()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            # 1x1 conv so the skip connection has the right channel count
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (Appendix B)."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W)
        k = self.k(h).reshape(B, C, H * W)
        v = self.v(h).reshape(B, C, H * W)
        # w[b, i, j] = <q[b, :, i], k[b, :, j]> / sqrt(C), softmax over j
        w = torch.bmm(q.transpose(1, 2), k) * (C ** -0.5)
        w = torch.softmax(w, dim=2)
        # out[b, c, i] = sum_j w[b, i, j] v[b, c, j]
        out = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TensorFlow "SAME" padding: for an even input
    size that is 0 rows/cols of padding before and 1 after."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution level of the U-Net: residual blocks, optional attention
    after each block (keyed by block number), optional resampling."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleDict()   # str(i_block) -> AttnBlock


class DDPMUNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise that was added to x_0."""

    def __init__(self, in_ch, ch, ch_mult, num_res_blocks, attn_resolutions,
                 groups, img=32, dropout=0.0, out_channels=None):
        super().__init__()
        self.num_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        temb_ch = 4 * ch

        self.temb = TimeEmbedding(ch)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        # Down path.  skip_chs records the channel count of every tensor
        # pushed on the skip stack, so the up path knows what it concatenates.
        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur_ch, res = ch, img
        for i_level, mult in enumerate(ch_mult):
            level = Level()
            out_ch = ch * mult
            for i_block in range(num_res_blocks):
                level.block.append(ResBlock(cur_ch, out_ch, temb_ch, groups, dropout))
                cur_ch = out_ch
                if res in attn_resolutions:
                    level.attn[str(i_block)] = AttnBlock(cur_ch, groups)
                skip_chs.append(cur_ch)
            if i_level != self.num_levels - 1:
                level.downsample = Downsample(cur_ch)
                res //= 2
                skip_chs.append(cur_ch)
            self.down.append(level)

        # Middle
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(cur_ch, cur_ch, temb_ch, groups, dropout)
        self.mid.attn_1 = AttnBlock(cur_ch, groups)
        self.mid.block_2 = ResBlock(cur_ch, cur_ch, temb_ch, groups, dropout)

        # Up path.  Built from the deepest level upwards, but stored so that
        # self.up[i_level] is the level at the same resolution as
        # self.down[i_level] (this is what makes the state_dict keys match).
        up_levels = [None] * self.num_levels
        for i_level in reversed(range(self.num_levels)):
            level = Level()
            out_ch = ch * ch_mult[i_level]
            for i_block in range(num_res_blocks + 1):
                level.block.append(ResBlock(cur_ch + skip_chs.pop(), out_ch,
                                            temb_ch, groups, dropout))
                cur_ch = out_ch
                if res in attn_resolutions:
                    level.attn[str(i_block)] = AttnBlock(cur_ch, groups)
            if i_level != 0:
                level.upsample = Upsample(cur_ch)
                res *= 2
            up_levels[i_level] = level
        assert not skip_chs
        self.up = nn.ModuleList(up_levels)

        # Output
        self.norm_out = group_norm(cur_ch, groups)
        # out_ch = 2 in_ch for a learned variance (the official `learned`)
        self.conv_out = nn.Conv2d(cur_ch, out_channels or in_ch, 3, padding=1)

    def forward(self, x, t):
        temb = self.temb(t)

        hs = [self.conv_in(x)]
        for i_level in range(self.num_levels):
            level = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](hs[-1], temb)
                if str(i_block) in level.attn:
                    h = level.attn[str(i_block)](h)
                hs.append(h)
            if i_level != self.num_levels - 1:
                hs.append(level.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for i_level in reversed(range(self.num_levels)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](torch.cat([h, hs.pop()], dim=1), temb)
                if str(i_block) in level.attn:
                    h = level.attn[str(i_block)](h)
            if i_level != 0:
                h = level.upsample(h)
        assert not hs

        return self.conv_out(F.silu(self.norm_out(h)))


def build_model(config):
    """Build a DDPMUNet from a dict with the keys used in PRESETS
    (img and dropout are optional)."""
    return DDPMUNet(
        in_ch=int(config["in_ch"]),
        ch=int(config["ch"]),
        ch_mult=[int(m) for m in config["ch_mult"]],
        num_res_blocks=int(config["num_res_blocks"]),
        attn_resolutions=[int(r) for r in config["attn_resolutions"]],
        groups=int(config["groups"]),
        img=int(config.get("img", 32)),
        dropout=float(config.get("dropout", 0.0)),
        out_channels=int(config["in_ch"]) * (2 if config.get("objective", ("eps", "fixedlarge", "simple"))[1] == "learned" else 1),
    )


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def loss_simple(model, x_t, t, eps):
    """L_simple (§3.4): mean over all elements of (eps - eps_theta)^2."""
    eps_theta = model(x_t, t)
    return eps_theta, torch.mean((eps - eps_theta) ** 2)


# ---------------------------------------------------------------------------
# Table 2's objectives, written here from the paper and the official
# diffusion_utils_2.py (not from ddpm.c): what the network outputs (eps, the
# posterior mean mu, or x_0), its variance (beta_t, beta_tilde_t, or a learned
# log-variance as a second half of the output channels), and the loss
# (unweighted MSE on the output's target, or the true bound's term L_{t-1},
# the decoder L_0 at t = 1, in bits/dim).
# ---------------------------------------------------------------------------
MEAN_TYPES = ("eps", "mu", "x0")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned")
LOSS_TYPES = ("simple", "mse", "kl")


def linear_schedule(T=1000):
    """§4's linear betas and the quantities of Eqs. (4), (6)-(7), in float64."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_lv = np.log(np.append(post_var[1], post_var[1:]))       # beta_tilde_2 at t = 1
    return dict(
        betas=betas, abar=abar, post_lv=post_lv,
        coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        large_lv=np.log(np.append(post_var[1], betas[1:])),        # fixedlarge: beta_tilde_2 at t = 1
    )


def gaussian_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def decoder_nll(x0, mean, log_scale):
    """-log of the Gaussian mass of x0's bin of width 2/255 (Eq. 13), end bins open."""
    inv = torch.exp(-log_scale)
    cdf_plus = torch.where(x0 > 0.999, torch.ones_like(x0), torch.special.ndtr(inv * (x0 - mean + 1 / 255)))
    cdf_min = torch.where(x0 < -0.999, torch.zeros_like(x0), torch.special.ndtr(inv * (x0 - mean - 1 / 255)))
    return -torch.log(torch.clamp(cdf_plus - cdf_min, min=1e-12))


def vb_term(x0, mean_q, logvar_q, mean_p, logvar_p, t):
    """L_{t-1} per image in bits/dim: the KL of Eq. (5) for t > 1, the decoder at t = 1."""
    kl = gaussian_kl(mean_q, logvar_q, mean_p, logvar_p).mean(dim=(1, 2, 3))
    nll = decoder_nll(x0, mean_p, 0.5 * logvar_p).mean(dim=(1, 2, 3))
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def objective_loss(out, x0, x_t, eps, t, objective):
    mean_type, var_type, loss_type = objective
    S = linear_schedule()
    ti = t.long().numpy()
    col = lambda a: torch.from_numpy(a[ti]).to(out.dtype).view(-1, 1, 1, 1)
    C = x0.shape[1]
    mean_out = out[:, :C]
    mean_q = col(S["coef1"]) * x0 + col(S["coef2"]) * x_t
    if loss_type in ("simple", "mse"):
        target = {"eps": eps, "x0": x0, "mu": mean_q}[mean_type]
        return torch.mean((mean_out - target) ** 2)
    if mean_type == "eps":
        x0_hat = torch.sqrt(1.0 / col(S["abar"])) * x_t - torch.sqrt(1.0 / col(S["abar"]) - 1.0) * mean_out
        mean_p = col(S["coef1"]) * x0_hat + col(S["coef2"]) * x_t
    elif mean_type == "x0":
        mean_p = col(S["coef1"]) * mean_out + col(S["coef2"]) * x_t
    else:
        mean_p = mean_out
    if var_type == "learned":
        logvar_p = out[:, C:]
    else:
        logvar_p = col(S["large_lv"] if var_type == "fixedlarge" else S["post_lv"]).expand_as(mean_p)
    logvar_q = col(S["post_lv"])
    return vb_term(x0, mean_q, logvar_q, mean_p, logvar_p, t.long()).mean()


# ---------------------------------------------------------------------------
# Exchange file
# ---------------------------------------------------------------------------

class ExchangeError(Exception):
    """A malformed exchange file."""


def read_exchange(path):
    """Parse an exchange file into an ordered dict name -> float32 array."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ExchangeError(f"{path}: cannot read: {e.strerror}")

    pos = 0

    def take(n, what):
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise ExchangeError(f"{path}: truncated while reading {what} "
                                f"(offset {pos}, need {n} bytes, file has {len(data)})")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    def take_i32(what):
        return struct.unpack("<i", take(4, what))[0]

    if take(len(MAGIC), "magic") != MAGIC:
        raise ExchangeError(f"{path}: bad magic (expected {MAGIC.decode()})")
    n_records = take_i32("record count")
    if n_records < 0:
        raise ExchangeError(f"{path}: negative record count {n_records}")

    records = {}
    for r in range(n_records):
        name_len = take_i32(f"name length of record {r}")
        if name_len <= 0 or name_len > 4096:
            raise ExchangeError(f"{path}: record {r} has bad name length {name_len}")
        try:
            name = take(name_len, f"name of record {r}").decode("ascii")
        except UnicodeDecodeError:
            raise ExchangeError(f"{path}: record {r} name is not ASCII")
        ndim = take_i32(f"ndim of {name}")
        if ndim < 0 or ndim > 8:
            raise ExchangeError(f"{path}: {name} has bad ndim {ndim}")
        shape = tuple(take_i32(f"shape of {name}") for _ in range(ndim))
        if any(s < 0 for s in shape):
            raise ExchangeError(f"{path}: {name} has negative shape {shape}")
        count = int(np.prod(shape, dtype=np.int64))
        raw = take(4 * count, f"data of {name}")
        if name in records:
            raise ExchangeError(f"{path}: duplicate record {name}")
        records[name] = np.frombuffer(raw, dtype="<f4").reshape(shape).copy()

    if pos != len(data):
        raise ExchangeError(f"{path}: {len(data) - pos} trailing bytes after "
                            f"{n_records} records")
    return records


def write_exchange(path, records):
    """Write name -> array records in the exchange format (float32)."""
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<i", len(records)))
        for name, arr in records.items():
            arr = np.ascontiguousarray(arr, dtype="<f4")
            enc = name.encode("ascii")
            f.write(struct.pack("<i", len(enc)))
            f.write(enc)
            f.write(struct.pack("<i", arr.ndim))
            f.write(struct.pack(f"<{arr.ndim}i", *arr.shape))
            f.write(arr.tobytes())


CONFIG_SCALARS = ["in_ch", "ch", "num_res_blocks", "groups", "img"]
CONFIG_LISTS = ["ch_mult", "attn_resolutions"]


def config_from_records(records, path):
    config = {}
    if "config.objective" in records:
        k = [int(round(float(v))) for v in records["config.objective"].reshape(-1)]
        if len(k) != 3 or not (0 <= k[0] < 3 and 0 <= k[1] < 3 and 0 <= k[2] < 3):
            raise ExchangeError(f"{path}: config.objective should hold three kinds")
        config["objective"] = (MEAN_TYPES[k[0]], VAR_TYPES[k[1]], LOSS_TYPES[k[2]])
    for key in CONFIG_SCALARS + CONFIG_LISTS:
        name = "config." + key
        if name not in records:
            raise ExchangeError(f"{path}: missing record {name}")
        vals = [int(round(float(v))) for v in records[name].reshape(-1)]
        if key in CONFIG_SCALARS:
            if len(vals) != 1:
                raise ExchangeError(f"{path}: {name} should hold one value")
            config[key] = vals[0]
        else:
            config[key] = vals
    return config


def config_to_records(config):
    recs = {}
    for key in CONFIG_SCALARS:
        recs["config." + key] = np.array([config[key]], dtype=np.float32)
    for key in CONFIG_LISTS:
        recs["config." + key] = np.array(config[key], dtype=np.float32)
    return recs


# ---------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------

def rel_err(a, ref, scale=0.0):
    """Normwise relative error: max|a - ref| / max(max|ref|, scale, TINY)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = max(float(np.max(np.abs(ref), initial=0.0)), scale, TINY)
    return float(np.max(np.abs(a - ref), initial=0.0)) / denom


def is_zero_gradient(name):
    """True for parameters whose gradient is exactly zero in exact arithmetic.

    The attention key bias b_k adds q_i . b_k to every logit w[i, j] of row i,
    i.e. the same constant for all j, and softmax over j ignores constants.
    So d loss / d b_k = 0 and any computed value is pure rounding noise: a
    relative error against zero would be meaningless.  For these we measure
    the error against the scale of the matching k.weight gradient instead
    (both are sums over positions of d loss / d k, see check_file).
    """
    return name.endswith(".k.bias")


def run_torch(model, x_t, t, eps, dtype, objective=None, x0=None):
    """Forward + backward of L_simple (or of an objective of Table 2) in the
    given dtype.  Returns (eps_theta, loss, {param name: grad}, d loss / d
    output) as float64 numpy arrays."""
    model = copy.deepcopy(model).to(dtype).eval()
    model.zero_grad(set_to_none=True)
    x_t, t, eps = (torch.from_numpy(a).to(dtype) for a in (x_t, t, eps))
    if objective is None:
        eps_theta, loss = loss_simple(model, x_t, t, eps)
    else:
        eps_theta = model(x_t, t)
        loss = objective_loss(eps_theta, torch.from_numpy(x0).to(dtype), x_t, eps, t, objective)
    eps_theta.retain_grad()
    loss.backward()
    grads = {name: p.grad.detach().double().numpy()
             for name, p in model.named_parameters()}
    return (eps_theta.detach().double().numpy(),
            np.array([loss.item()]), grads, eps_theta.grad.detach().double().numpy())


def check_terms(records):
    """The bound's term per image on its own (Eq. 5: the KL for t > 1, the
    decoder of Eq. 13 at t = 1), and its gradient with respect to p_theta's mean
    and log variance, against autograd in float64.  Returns table rows."""
    x0, t = (torch.from_numpy(records[n]).double() for n in ("input.x_0", "input.t"))
    mean_q = torch.from_numpy(records["term.mean_q"]).double()
    logvar_q = torch.from_numpy(records["term.logvar_q"]).double().view(-1, 1, 1, 1)
    mean_p = torch.from_numpy(records["term.mean_p"]).double().requires_grad_()
    logvar_p = torch.from_numpy(records["term.logvar_p"]).double().requires_grad_()
    value = vb_term(x0, mean_q, logvar_q, mean_p, logvar_p, t.long())
    value.sum().backward()
    v, dm, dl = (a.detach().numpy() for a in (value, mean_p.grad, logvar_p.grad))
    return [("term.value (KL, decoder; f64 only)", records["term.value"], v, v, FORWARD_TOL, 0.0),
            ("term.d_mean (f64 only)", records["term.d_mean"], dm, dm, GRAD_TOL, 0.0),
            ("term.d_logvar (f64 only)", records["term.d_logvar"], dl, dl, GRAD_TOL, 0.0)]


# DPM-Solver++'s steps: ddpm.c's float32 step against a float64 one from the same x and
# eps_theta. x0_hat = x / sqrt(abar) - eps sqrt(1/abar - 1) is a difference of two terms
# of up to sqrt(1/abar_s) max(|x|, |eps|) (156 x that at t = T), each rounded to float32
# (unit roundoff u = 2^-24): the bound allows 4 such roundings of each x0_hat the step
# uses (this step's, and for a second-order step the one before it), times its weight in
# the step, plus 1e-6 for the rest.
DPM_U = 2.0 ** -24


def dpm_log_snr_steps(abar, K):
    """DPM-Solver++'s K steps (0-based t, ascending), even in lambda = log(alpha/sigma):
    for each target the nearest t above the previous one that leaves room for the rest."""
    lam = 0.5 * np.log(abar / (1.0 - abar))
    T = len(abar)
    if K == 1:
        return [T - 1]
    steps, prev = [], -1
    for i in range(K):
        want = lam[0] + i * (lam[T - 1] - lam[0]) / (K - 1)
        cand = np.arange(prev + 1, T - K + i + 1)
        prev = int(cand[np.argmin(np.abs(lam[cand] - want))])
        steps.append(prev)
    return steps


def check_dpm(path, records):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2, data prediction), transcribed in
    float64 from the paper, against ddpm.c's chain (tests/dump_ref --dpm K): the same
    steps, and each step's x from ddpm.c's x before it and the eps_theta its network gave."""
    print(f"== {path} (DPM-Solver++(2M) chain)")
    abar_all = linear_schedule()["abar"]
    t = [int(v) for v in records["dpm.t"]]
    K = len(t)
    steps = dpm_log_snr_steps(abar_all, K)[::-1]          # t = T first
    ok = t == steps
    print(f"{'PASS' if ok else 'FAIL'} steps even in log-SNR: ddpm.c {t}, float64 {steps}")
    n_pass, n_fail = (1, 0) if ok else (0, 1)
    alpha = lambda a: math.sqrt(a)
    sigma = lambda a: math.sqrt(1.0 - a)
    x0_prev, h_prev, e_prev = None, None, 0.0
    for i in range(K):
        x = records["dpm.x_T" if i == 0 else f"dpm.x.{i - 1}"].astype(np.float64)
        a_s = abar_all[steps[i]]
        a_t = abar_all[steps[i + 1]] if i + 1 < K else 1.0     # the last step ends at abar_0 = 1
        eps = records[f"dpm.eps.{i}"].astype(np.float64)
        x0 = np.clip((x - sigma(a_s) * eps) / alpha(a_s), -1.0, 1.0)   # Eq. (15), clipped
        c1, c0, cd = 1.0, 0.0, 1.0
        if a_t == 1.0:                                          # sigma = 0: x_0 = x0_hat
            x_next, h = x0, None
        else:
            h = math.log(alpha(a_t) / sigma(a_t)) - math.log(alpha(a_s) / sigma(a_s))
            if x0_prev is not None:
                c1, c0 = 1 + 1 / (2 * (h_prev / h)), -1 / (2 * (h_prev / h))
            cd = -alpha(a_t) * (math.exp(-h) - 1.0)
            x_next = sigma(a_t) / sigma(a_s) * x + cd * (c1 * x0 + c0 * (0 if x0_prev is None else x0_prev))
        err = rel_err(records[f"dpm.x.{i}"], x_next)
        e_x0 = 4 * DPM_U * max(np.abs(x).max(), np.abs(eps).max()) / math.sqrt(a_s)
        tol = 1e-6 + abs(cd) * (abs(c1) * e_x0 + abs(c0) * e_prev) / max(1.0, np.abs(x_next).max())
        ok = err < tol
        n_pass, n_fail = n_pass + ok, n_fail + (not ok)
        print(f"{'PASS' if ok else 'FAIL'} step {i + 1} of {K} (t = {steps[i] + 1}, "
              f"{'first order' if x0_prev is None or h is None else 'second order'}): "
              f"rel. error {err:.2e} (tol {tol:.1e})")
        x0_prev, h_prev, e_prev = x0, h, e_x0
    return n_pass, n_fail


def check_file(path, records):
    """Compare one exchange file against PyTorch.  Returns (passed, failed)."""
    if "dpm.t" in records:
        return check_dpm(path, records)
    print(f"== {path}")
    config = config_from_records(records, path)
    print("   config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    model = build_model(config)
    state = model.state_dict()
    n_pass, n_fail = 0, 0

    # --- check 1: names and shapes -------------------------------------
    problems = []
    for name in ("input.x_t", "input.t", "input.eps", "output.eps_theta", "output.loss"):
        if name not in records:
            problems.append(f"missing record {name}")
    param_names = {n[len("param."):] for n in records if n.startswith("param.")}
    grad_names = {n[len("grad."):] for n in records if n.startswith("grad.")}
    expected = set(state.keys())
    for n in sorted(expected - param_names):
        problems.append(f"missing param.{n} {tuple(state[n].shape)}")
    for n in sorted(param_names - expected):
        problems.append(f"unexpected param.{n}")
    for n in sorted(expected - grad_names):
        problems.append(f"missing grad.{n}")
    for n in sorted(grad_names - expected):
        problems.append(f"unexpected grad.{n}")
    for n in sorted(expected):
        want = tuple(state[n].shape)
        for prefix in ("param.", "grad."):
            if prefix + n in records and records[prefix + n].shape != want:
                problems.append(f"{prefix}{n} has shape {records[prefix + n].shape}, "
                                f"expected {want}")
    objective = config.get("objective")
    if objective and not all(n in records for n in ("input.x_0", "output.d_out", "term.value")):
        problems.append("an objective's file needs input.x_0, output.d_out and term.*")
    if not problems:
        B = records["input.x_t"].shape[0] if records["input.x_t"].ndim == 4 else -1
        img_shape = (B, config["in_ch"], config["img"], config["img"])
        out_shape = (B, model.conv_out.out_channels, config["img"], config["img"])
        for name, want in (("input.x_t", img_shape), ("input.t", (B,)),
                           ("input.eps", img_shape), ("output.eps_theta", out_shape),
                           ("output.loss", (1,))):
            if records[name].shape != want:
                problems.append(f"{name} has shape {records[name].shape}, expected {want}")
    if problems:
        print(f"   FAIL names/shapes: {len(problems)} problem(s)")
        for p in problems:
            print(f"        {p}")
        print("   (cannot compare values without a matching layout)")
        return 0, 1
    print(f"   PASS names/shapes: {len(expected)} parameters, "
          f"{count_params(model):,} values, batch {records['input.x_t'].shape[0]}")
    n_pass += 1

    # --- forward/backward in float32 and float64 -------------------------
    model.load_state_dict({n: torch.from_numpy(records["param." + n]) for n in expected})
    x_t, t, eps = records["input.x_t"], records["input.t"], records["input.eps"]
    x0 = records.get("input.x_0")
    out32, loss32, g32, d32 = run_torch(model, x_t, t, eps, torch.float32, objective, x0)
    out64, loss64, g64, d64 = run_torch(model, x_t, t, eps, torch.float64, objective, x0)
    if objective:
        print("   objective (Table 2): --mean-type {} --var-type {} --loss {}".format(*objective))

    # Rows: (label, C value, torch float32, torch float64, tolerance, scale).
    # scale is a floor for the relative error's denominator; it is only
    # non-zero for the analytically-zero key-bias gradients (marked "*").
    rows = [("output.eps_theta", records["output.eps_theta"], out32, out64, FORWARD_TOL, 0.0),
            ("output.loss", records["output.loss"], loss32, loss64, FORWARD_TOL, 0.0)]
    if objective:
        rows.append(("output.d_out (d loss / d output)", records["output.d_out"], d32, d64, GRAD_TOL, 0.0))
        rows += check_terms(records)
    for name, _ in model.named_parameters():
        scale, label = 0.0, "grad." + name
        if is_zero_gradient(name):
            scale = float(np.max(np.abs(g64[name[:-len("bias")] + "weight"])))
            label += " *"
        rows.append((label, records["grad." + name], g32[name], g64[name], GRAD_TOL, scale))

    # --- table -----------------------------------------------------------
    w = max(len(r[0]) for r in rows)
    header = (f"   {'tensor':<{w}}  {'abs C-t32':>10}  {'rel C-t32':>10}  "
              f"{'rel C-f64':>10}  {'rel t32-f64':>11}  {'tol':>7}  result")
    print(header)
    print("   " + "-" * (len(header) - 3))
    worst = {"forward": ("", 0.0), "gradient": ("", 0.0)}
    for name, c, r32, r64, tol, scale in rows:
        c = c.astype(np.float64)
        abs_c32 = float(np.max(np.abs(c - r32), initial=0.0))
        rel_c32 = rel_err(c, r32, scale)
        rel_c64 = rel_err(c, r64, scale)
        rel_t64 = rel_err(r32, r64, scale)
        ok = bool(np.all(np.isfinite(c))) and rel_c64 < tol
        n_pass += ok
        n_fail += not ok
        kind = "gradient" if name.startswith("grad.") else "forward"
        if not (rel_c64 <= worst[kind][1]):         # also catches NaN
            worst[kind] = (name, rel_c64)
        print(f"   {name:<{w}}  {abs_c32:10.3e}  {rel_c32:10.3e}  {rel_c64:10.3e}  "
              f"{rel_t64:11.3e}  {tol:7.0e}  {'PASS' if ok else 'FAIL'}")
    if any(r[5] for r in rows):
        print("   * exactly zero in exact arithmetic (softmax ignores the key bias);"
              " errors are relative to the k.weight gradient's scale")
    print(f"   worst forward: {worst['forward'][1]:.3e} ({worst['forward'][0]}, "
          f"tol {FORWARD_TOL:.0e}); worst gradient: {worst['gradient'][1]:.3e} "
          f"({worst['gradient'][0]}, tol {GRAD_TOL:.0e})")
    return n_pass, n_fail


# ---------------------------------------------------------------------------
# Self-test: torch writes an exchange file and then checks it against itself
# ---------------------------------------------------------------------------

def randomize(model, gen):
    """Random weights for every parameter (not the official init), so that
    every path, including normalisation affine terms, carries signal."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def make_exchange_records(config, batch=2, seed=0):
    """Records for an exchange file, computed by torch in float32."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    randomize(model, gen)
    shape = (batch, config["in_ch"], config["img"], config["img"])
    x_t = torch.randn(shape, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen).float()
    eps = torch.randn(shape, generator=gen)

    eps_theta, loss = loss_simple(model, x_t, t, eps)
    loss.backward()

    recs = config_to_records(config)
    recs["input.x_t"] = x_t.numpy()
    recs["input.t"] = t.numpy()
    recs["input.eps"] = eps.numpy()
    recs["output.eps_theta"] = eps_theta.detach().numpy()
    recs["output.loss"] = np.array([loss.item()], dtype=np.float32)
    for name, p in model.named_parameters():
        recs["param." + name] = p.detach().numpy()
    for name, p in model.named_parameters():
        recs["grad." + name] = p.grad.numpy()
    return recs


def self_test(preset="tiny", batch=2):
    counts = {}
    for name in ("tiny", "small", "paper"):
        counts[name] = count_params(build_model(PRESETS[name]))
        print(f"parameters[{name}] = {counts[name]:,}")
    assert counts["paper"] == PAPER_PARAM_COUNT, \
        f"paper preset has {counts['paper']} parameters, expected {PAPER_PARAM_COUNT}"

    config = {k: v for k, v in PRESETS[preset].items() if k != "dropout"}
    recs = make_exchange_records(config, batch=batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"selftest_{preset}.bin")
        write_exchange(path, recs)

        # A truncated copy must be rejected with a one-line error.
        bad = os.path.join(tmp, "truncated.bin")
        with open(path, "rb") as f:
            data = f.read()
        with open(bad, "wb") as f:
            f.write(data[:len(data) // 2])
        try:
            read_exchange(bad)
        except ExchangeError as e:
            assert "\n" not in str(e)
            print(f"truncated file rejected: {e}")
        else:
            raise AssertionError("truncated exchange file was accepted")

        # And a renamed parameter must fail the name check.
        renamed = dict(recs)
        renamed["param.conv_in.weightX"] = renamed.pop("param.conv_in.weight")
        p, f_ = check_file("(renamed-parameter copy)", renamed)
        assert (p, f_) == (0, 1), "a renamed parameter was not detected"

        return check_file(path, read_exchange(path))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv):
    torch.set_num_threads(os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)

    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2

    if args[0] == "--self-test":
        preset, batch = "tiny", 2
        rest = args[1:]
        while rest:
            opt = rest.pop(0)
            if opt == "--preset" and rest:
                preset = rest.pop(0)
            elif opt == "--batch" and rest:
                batch = int(rest.pop(0))
            else:
                print(f"error: unknown option {opt}", file=sys.stderr)
                return 2
        if preset not in PRESETS:
            print(f"error: unknown preset {preset} (have {', '.join(PRESETS)})",
                  file=sys.stderr)
            return 2
        n_pass, n_fail = self_test(preset, batch)
    else:
        # Parse everything first so a bad file fails fast.
        try:
            files = [(p, read_exchange(p)) for p in args]
            for p, recs in files:
                config_from_records(recs, p)
        except ExchangeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        n_pass, n_fail = 0, 0
        for p, recs in files:
            a, b = check_file(p, recs)
            n_pass += a
            n_fail += b

    print(f"{n_pass} passed, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
