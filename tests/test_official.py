#!/usr/bin/python3
"""Offline test of data/convert_official.py (the paper's CIFAR-10 weights, diffusers layout).

The published file cannot be downloaded here, so this test builds one in its layout:
tests/reference.py's PyTorch U-Net (paper preset) with random weights, renamed into
diffusers' names and layouts by a mapping written here, independently of the converter,
and saved as safetensors by a small writer. The converter must turn it into a ddpm.c
checkpoint whose eps_theta (tests/dump_ref --checkpoint) is the PyTorch model's on the
same x_t and t. The names are checked against a fixture: the key list of
google/ddpm-cifar10-32 as its config.json (block_out_channels 128, 256, 256, 256;
layers_per_block 2; AttnDownBlock2D second, AttnUpBlock2D third) and diffusers' UNet2DModel
modules give it. It is derived, not read from the real file's index, and the README says so.
Broken files must be refused in one line. Prints "N passed, N failed".
"""
import json, os, re, signal, stat, struct, subprocess, sys, tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from reference import PRESETS, build_model, randomize, read_exchange, rel_err, FORWARD_TOL  # noqa: E402

CONVERTER = os.path.join(ROOT, "data", "convert_official.py")
results = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(("PASS " if ok else "FAIL ") + name + ("" if ok else ": " + detail), flush=True)


# The published layouts, from each model's config.json: block_out_channels, and the one
# down block with attention (AttnDownBlock2D; its up block is AttnUpBlock2D at L - 1 - i).
# layers_per_block is 2 and norm_num_groups 32 in both.
CIFAR10_LAYOUT = dict(chans=[128, 256, 256, 256], attn=1)           # google/ddpm-cifar10-32
LSUN_LAYOUT = dict(chans=[128, 128, 256, 256, 512, 512], attn=4)    # google/ddpm-{church,bedroom,cat,celebahq}-256


def fixture_keys(chans=CIFAR10_LAYOUT["chans"], attn=CIFAR10_LAYOUT["attn"]):
    """diffusers UNet2DModel's state_dict keys and shapes for that layout."""
    ch, L = chans[0], len(chans)
    out = {"conv_in.weight": (ch, 3, 3, 3), "conv_in.bias": (ch,),
           "time_embedding.linear_1.weight": (4 * ch, ch), "time_embedding.linear_1.bias": (4 * ch,),
           "time_embedding.linear_2.weight": (4 * ch, 4 * ch), "time_embedding.linear_2.bias": (4 * ch,),
           "conv_norm_out.weight": (ch,), "conv_norm_out.bias": (ch,),
           "conv_out.weight": (3, ch, 3, 3), "conv_out.bias": (3,)}

    def resnet(p, cin, cout):
        out.update({f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,),
                    f"{p}.conv1.weight": (cout, cin, 3, 3), f"{p}.conv1.bias": (cout,),
                    f"{p}.time_emb_proj.weight": (cout, 4 * ch), f"{p}.time_emb_proj.bias": (cout,),
                    f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,),
                    f"{p}.conv2.weight": (cout, cout, 3, 3), f"{p}.conv2.bias": (cout,)})
        if cin != cout:
            out.update({f"{p}.conv_shortcut.weight": (cout, cin, 1, 1), f"{p}.conv_shortcut.bias": (cout,)})

    def attention(p, c):
        out.update({f"{p}.group_norm.weight": (c,), f"{p}.group_norm.bias": (c,)})
        for k in ("query", "key", "value", "proj_attn"):
            out.update({f"{p}.{k}.weight": (c, c), f"{p}.{k}.bias": (c,)})

    prev = ch
    for i, c in enumerate(chans):                       # DownBlock2D, ..., AttnDownBlock2D at attn, ...
        for j in range(2):
            resnet(f"down_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
            if i == attn:
                attention(f"down_blocks.{i}.attentions.{j}", c)
        prev = c
        if i < L - 1:
            out.update({f"down_blocks.{i}.downsamplers.0.conv.weight": (c, c, 3, 3),
                        f"down_blocks.{i}.downsamplers.0.conv.bias": (c,)})
    top = chans[-1]
    resnet("mid_block.resnets.0", top, top)
    attention("mid_block.attentions.0", top)
    resnet("mid_block.resnets.1", top, top)
    rev = chans[::-1]                                   # UpBlock2D, ..., AttnUpBlock2D at L - 1 - attn, ...
    prev = top
    for i, c in enumerate(rev):
        skip_in = rev[min(i + 1, L - 1)]
        for j in range(3):
            skip = c if j < 2 else skip_in
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else c) + skip, c)
            if i == L - 1 - attn:
                attention(f"up_blocks.{i}.attentions.{j}", c)
        prev = c
        if i < L - 1:
            out.update({f"up_blocks.{i}.upsamplers.0.conv.weight": (c, c, 3, 3),
                        f"up_blocks.{i}.upsamplers.0.conv.bias": (c,)})
    return out


def to_diffusers(name, L=4):
    """tests/reference.py's state_dict name -> diffusers', by rules written for this test."""
    rules = [(r"^temb\.dense0\.", "time_embedding.linear_1."), (r"^temb\.dense1\.", "time_embedding.linear_2."),
             (r"^norm_out\.", "conv_norm_out."),
             (r"^mid\.block_1\.", "mid_block.resnets.0."), (r"^mid\.block_2\.", "mid_block.resnets.1."),
             (r"^mid\.attn_1\.", "mid_block.attentions.0."),
             (r"^down\.(\d)\.block\.", r"down_blocks.\1.resnets."), (r"^down\.(\d)\.attn\.", r"down_blocks.\1.attentions."),
             (r"^down\.(\d)\.downsample\.", r"down_blocks.\1.downsamplers.0."),
             (r"^up\.(\d)\.block\.", lambda m: f"up_blocks.{L - 1 - int(m.group(1))}.resnets."),
             (r"^up\.(\d)\.attn\.", lambda m: f"up_blocks.{L - 1 - int(m.group(1))}.attentions."),
             (r"^up\.(\d)\.upsample\.", lambda m: f"up_blocks.{L - 1 - int(m.group(1))}.upsamplers.0."),
             (r"\.temb_proj\.", ".time_emb_proj."), (r"\.nin_shortcut\.", ".conv_shortcut."),
             (r"(attentions\.\d)\.norm\.", r"\1.group_norm."), (r"(attentions\.\d)\.q\.", r"\1.query."),
             (r"(attentions\.\d)\.k\.", r"\1.key."), (r"(attentions\.\d)\.v\.", r"\1.value."),
             (r"(attentions\.\d)\.proj_out\.", r"\1.proj_attn.")]
    for pat, rep in rules:
        name = re.sub(pat, rep, name)
    return name


def diffusers_state(model, L):
    """The model's weights under diffusers' names and shapes, as float32 arrays."""
    diff = {}
    for k, v in model.state_dict().items():
        d, v = to_diffusers(k, L), v.detach().float().numpy()
        diff[d] = v.reshape(v.shape[:2]) if ".attentions." in d and v.ndim == 4 else v
    return diff


def save_safetensors(path, tensors, dtype="F32", cut=0, header_len_extra=0):
    """name -> float32 array; dtype only relabels (for the wrong-dtype test)."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    data = struct.pack("<Q", len(h) + header_len_extra) + h + b"".join(blobs)
    with open(path, "wb") as f:
        f.write(data[:len(data) - cut] if cut else data)


def convert(src, out, model=None):
    r = subprocess.run([sys.executable, CONVERTER, src, out, "--ddpm", os.path.join(ROOT, "ddpm")] +
                       (["--model", model] if model else []), capture_output=True, text=True)
    return r.returncode, r.stderr.strip()


def raw_file(path, header_bytes, body=b""):
    """A safetensors file with the given header bytes, as they are."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + body)


def run_converter(args, env=None, limit_fsize=None):
    def limits():
        if limit_fsize is not None:
            import resource
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))
    r = subprocess.run([sys.executable, CONVERTER] + args, capture_output=True, text=True, env=env,
                       preexec_fn=limits if limit_fsize is not None else None, timeout=300)
    return r.returncode, r.stderr.strip()


def one_line(rc, err, word=""):
    return rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err and word in err


def hostile(tmp, diff):
    """Hardening II: broken headers, special files, missing folders, full disks, signals:
    one line, exit 1 (130 on a signal), no traceback, nothing left behind."""
    ddpm = os.path.join(ROOT, "ddpm")
    out = os.path.join(tmp, "h.ckpt")
    src = os.path.join(tmp, "h.safetensors")
    one = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    cases = {
        "deeply nested JSON": (b"[" * 100000 + b"]" * 100000, "nested"),
        "data_offsets a dict": (json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": {"x": 1}}}).encode(), "data_offsets"),
        "data_offsets a string": (json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": "0,4"}}).encode(), "data_offsets"),
        "data_offsets nulls": (json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [None, None]}}).encode(), "data_offsets"),
        "data_offsets floats": (json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.5]}}).encode(), "data_offsets"),
        "a shape of 1e400": (b'{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', "shape"),
        "duplicate JSON keys": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "twice"),
        "overlapping data_offsets": (json.dumps(dict(one, b={"dtype": "F32", "shape": [1], "data_offsets": [2, 6]})).encode(), "overlap"),
    }
    for what, (header, word) in cases.items():
        raw_file(src, header, b"\0" * 8)
        rc, err = run_converter([src, out, "--ddpm", ddpm])
        check(f"converter refuses in one line, no traceback: {what}", one_line(rc, err, word) and not os.path.exists(out),
              f"exit {rc}: {err[-300:]}")
    fifo = os.path.join(tmp, "fifo")
    os.mkfifo(fifo)
    for what, path in (("a FIFO", fifo), ("/dev/zero", "/dev/zero")):
        rc, err = run_converter([path, out, "--ddpm", ddpm])
        check(f"converter refuses {what} at once (not a regular file)", one_line(rc, err, "regular file"), f"exit {rc}: {err}")
    save_safetensors(src, diff)
    for what, args, word in (("a missing --ddpm", ["--ddpm", os.path.join(tmp, "none", "ddpm")], "--ddpm"),
                             ("a missing --keep-exchange folder", ["--ddpm", ddpm, "--keep-exchange",
                                                                   os.path.join(tmp, "none", "w.ref")], "--keep-exchange"),
                             ("a missing output folder", ["--ddpm", ddpm], "OUT")):
        o = os.path.join(tmp, "none", "x.ckpt") if what == "a missing output folder" else out
        rc, err = run_converter([src, o] + args)
        check(f"converter refuses {what} in one line", one_line(rc, err, word), f"exit {rc}: {err}")
    tmpdir = os.path.join(tmp, "tmpdir")
    os.mkdir(tmpdir)
    rc, err = run_converter([src, out, "--ddpm", ddpm], env=dict(os.environ, TMPDIR=tmpdir), limit_fsize=50 << 20)
    check("converter with a full TMPDIR (files limited to 50 MB): one line, nothing written or left",
          one_line(rc, err, "could not write") and not os.path.exists(out) and not os.listdir(tmpdir), f"exit {rc}: {err}")
    keep = os.path.join(tmp, "keep.ref")
    rc, err = run_converter([src, out, "--ddpm", ddpm, "--keep-exchange", keep], limit_fsize=50 << 20)
    left = [f for f in os.listdir(tmp) if f.startswith(("keep", "h.ckpt"))]
    check("converter with --keep-exchange on a full disk (50 MB): one line, no fragment", one_line(rc, err, "could not write")
          and not left, f"exit {rc}: {err}; left {left}")
    # the .source alone on a full disk: its write fails after the checkpoint's (ddpm's own
    # writes are not limited here: the limit is the converter's, set in its own process)
    r = subprocess.run([sys.executable, "-c", f"""
import os, resource, signal, sys
sys.path.insert(0, {os.path.join(ROOT, 'data')!r})
import convert_official as c
real = c.write_atomic
def full(path, chunks):
    if path.endswith(".source"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10, resource.RLIM_INFINITY))
    real(path, chunks)
c.write_atomic = full
sys.exit(c.main([{src!r}, {out!r}, "--ddpm", {ddpm!r}]))
"""], capture_output=True, text=True, timeout=300)
    err = r.stderr.strip()
    left = [f for f in os.listdir(tmp) if f.startswith("h.ckpt")]
    check("converter with a full disk at the .source: one line, no checkpoint and no empty .source left",
          one_line(r.returncode, err, ".source") and not left, f"exit {r.returncode}: {err}; left {left}")
    # Ctrl-C while ./ddpm import writes: nothing left, one line
    p = subprocess.Popen([sys.executable, CONVERTER, src, out, "--ddpm", ddpm], stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    import time
    for _ in range(400):   # until the import has started
        time.sleep(0.05)
        if subprocess.run(["pgrep", "-f", "import --weights"], capture_output=True).returncode == 0:
            break
    os.killpg(p.pid, signal.SIGINT)
    err = p.communicate(timeout=300)[1].strip()
    left = [f for f in os.listdir(tmp) if f.startswith("h.ckpt") or f.endswith(".tmp")]
    ok = (p.returncode == 130 and len(err.splitlines()) == 1 and "Traceback" not in err and not left) or \
         (p.returncode == 0 and os.path.exists(out + ".source"))   # it may finish before the signal lands
    check("converter on Ctrl-C: exit 130, one line, no .tmp or checkpoint left", ok, f"exit {p.returncode}: {err[-300:]}; left {left}")
    for f in (out, out + ".source"):
        if os.path.exists(f):
            os.unlink(f)
    # Hardening III (issue 36), defect 1: the converter's outputs, like ./ddpm's, must be
    # regular files or absent; a FIFO or a device there is refused, never replaced.
    fifo2 = os.path.join(tmp, "keep.fifo")
    os.mkfifo(fifo2)
    for what, args, node in (("--keep-exchange naming a FIFO", ["--keep-exchange", fifo2], fifo2),
                             ("OUT.source naming a FIFO", [], out + ".source")):
        if node == out + ".source":
            os.mkfifo(node)
        rc, err = run_converter([src, out, "--ddpm", ddpm] + args)
        kept = stat.S_ISFIFO(os.stat(node).st_mode)
        check(f"#36.1 converter with {what}: refused in ./ddpm's words, the node left as it was",
              one_line(rc, err, "exists and is not a regular file; not replacing it") and kept and not os.path.exists(out),
              f"exit {rc}: {err[-300:]}")
    os.unlink(out + ".source")
    os.mkfifo(keep + ".tmp")   # a FIFO where the converter's temporary file goes: removed, not opened (no hang)
    rc, err = run_converter([src, out, "--ddpm", ddpm, "--keep-exchange", keep])
    check("#36.1 converter with a FIFO at --keep-exchange's PATH.tmp: made anew, no hang", rc == 0 and
          os.path.isfile(keep) and not os.path.exists(keep + ".tmp"), f"exit {rc}: {err[-300:]}")
    for f in (out, out + ".source", keep):
        if os.path.exists(f):
            os.unlink(f)


def fuzz_header(tmp, rounds=400):
    """The header parser on random and mutated headers, in this process: a refusal
    (Refused) is right, any other exception (a traceback) is a failure."""
    import random
    sys.path.insert(0, os.path.join(ROOT, "data"))
    import convert_official as c
    rng = random.Random(20200611)
    base = json.dumps({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                       "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
                       "__metadata__": {"format": "pt"}}).encode()
    src, crashes = os.path.join(tmp, "fuzz.safetensors"), []
    for i in range(rounds):
        h = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            op, k = rng.random(), rng.randrange(len(h))
            if op < 0.4:
                h[k] = rng.choice(b'{}[]",:0123456789-.eE nulltruefalse\\x')
            elif op < 0.6:
                del h[k:k + rng.randint(1, 8)]
            elif op < 0.8:
                h[k:k] = rng.choice([b"[", b"{", b'"x":', b"1e400", b"-1", b"null", b"[[", b"9" * 30])
            else:
                h[k:k] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            if not h:
                h = bytearray(b"{")
        raw_file(src, bytes(h), bytes(rng.randrange(256) for _ in range(rng.choice([0, 16, 32, 40]))))
        try:
            c.convert(c.read_safetensors(src))
        except c.Refused:
            pass
        except Exception as e:   # noqa: BLE001 -- any other exception is what this looks for
            crashes.append(f"{type(e).__name__}: {e} on {bytes(h)[:80]!r}")
    check(f"converter header fuzz: {rounds} random and mutated headers, every one refused or read, no traceback",
          not crashes, f"{len(crashes)} tracebacks, first: {crashes[:1]}")


FAKE_CURL = """#!/bin/sh
# curl for the test: serves the files of $FAKE_SRC by name; exit 22 (HTTP error) for others
out=/dev/null; prev=; for a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; url=$a; done
case $url in *config.json) echo '{}' > "$out"; exit 0;; esac
[ -f "$FAKE_SRC/${url##*/}" ] || exit 22
cp "$FAKE_SRC/${url##*/}" "$out"
"""


def download_script(tmp, binf, want):
    """data/get_official_weights.sh offline, against a curl that serves only a .bin: it
    falls back to the .bin, converts it into the checkpoint main() converted, checks a
    pinned sha256, and refuses an unknown MODEL."""
    repo = os.path.join(tmp, "repo")
    os.makedirs(os.path.join(repo, "data"))
    os.makedirs(os.path.join(repo, "bin"))
    for f in ("get_official_weights.sh", "convert_official.py"):
        subprocess.run(["cp", os.path.join(ROOT, "data", f), os.path.join(repo, "data", f)], check=True)
    os.symlink(os.path.join(ROOT, "ddpm"), os.path.join(repo, "ddpm"))
    with open(os.path.join(repo, "bin", "curl"), "w") as f:
        f.write(FAKE_CURL)
    os.chmod(os.path.join(repo, "bin", "curl"), 0o755)
    env = dict(os.environ, PATH=os.path.join(repo, "bin") + ":" + os.environ["PATH"], FAKE_SRC=os.path.dirname(binf),
               PYTHON=sys.executable)
    script = os.path.join(repo, "data", "get_official_weights.sh")

    def run(*args):
        r = subprocess.run(["sh", script] + list(args), capture_output=True, text=True, env=env, timeout=300)
        return r.returncode, r.stdout + r.stderr
    out = os.path.join(repo, "data", "official", "cifar10_ema.ckpt")
    rc, log = run()
    check("get_official_weights.sh without .safetensors fetches the .bin and converts it into the same checkpoint",
          rc == 0 and "no .safetensors there" in log and os.path.exists(out)
          and open(out, "rb").read() == open(want, "rb").read(), f"exit {rc}: {log[-400:]}")
    sha = re.search(r"^([0-9a-f]{64})  diffusion_pytorch_model\.bin$", log, re.M)
    if sha:
        with open(os.path.join(repo, "data", "official-weights.sha256"), "w") as f:
            f.write(("0" * 64) + "  church-256/diffusion_pytorch_model.safetensors\n" +
                    ("1" if sha.group(1)[0] == "0" else "0") + sha.group(1)[1:] + "  diffusion_pytorch_model.bin\n")
        for f in (out, out + ".source"):
            os.unlink(f)
        rc, log = run()
        check("get_official_weights.sh with a pinned sha256 that does not match: exit 1, nothing converted",
              rc == 1 and "sha256 mismatch" in log and not os.path.exists(out), f"exit {rc}: {log[-400:]}")
    rc, log = run("nosuch-256")
    check("get_official_weights.sh MODEL=nosuch-256: exit 2, naming the models",
          rc == 2 and "church-256" in log, f"exit {rc}: {log[-300:]}")
    subprocess.run(["rm", "-rf", repo])


def eps_matches(model, ckpt, batch, ref, what, double=True):
    """ddpm.c's eps_theta from ckpt (tests/dump_ref --checkpoint) against the model's on
    the same x_t and t, in float64 (or float32)."""
    r = subprocess.run([os.path.join(ROOT, "tests", "dump_ref"), "--checkpoint", ckpt, str(batch), ref],
                       capture_output=True, text=True)
    if r.returncode:
        check(f"tests/dump_ref --checkpoint runs ({what})", False, r.stderr.strip())
        return
    rec = read_exchange(ref)
    os.unlink(ref)
    x, t = torch.from_numpy(rec["input.x_t"]), torch.from_numpy(rec["input.t"])
    with torch.no_grad():
        want = (model.double()(x.double(), t.double()) if double else model(x, t).double()).numpy()
    model.float()
    e = rel_err(rec["output.eps_theta"], want)
    check(f"ddpm.c's eps_theta {what} = the PyTorch model's{'' if double else ' in float32'} "
          f"(rel. error {e:.1e} < {FORWARD_TOL:.0e})", e < FORWARD_TOL, f"{e:.3e}")


def lsun_layout(tmp, cifar):
    """The 256x256 models (google/ddpm-{church,bedroom,cat,celebahq}-256): a file in their
    published layout converts into ddpm.c's paper256, whose eps_theta is the PyTorch
    model's at batch 1; another model's file and a truncated file are refused in one line
    (a misnamed tensor is main()'s case, on the smaller CIFAR-10 file)."""
    torch.manual_seed(1)
    model = build_model(PRESETS["paper256"]).eval()
    randomize(model, torch.Generator().manual_seed(11))
    diff = diffusers_state(model, 6)
    fix = fixture_keys(**LSUN_LAYOUT)
    n_fix = sum(int(np.prod(s)) for s in fix.values())
    check(f"the 256x256 fixture lists {len(fix)} tensors, 113,673,219 values (the paper's 114M)",
          n_fix == 113_673_219, f"{len(fix)} tensors, {n_fix} values")
    bad = sorted(set(fix) ^ set(diff)) + [k for k in fix if k in diff and tuple(diff[k].shape) != fix[k]]
    check("the renamed PyTorch paper256 has exactly the 256x256 fixture's keys and shapes", not bad, str(bad[:5]))
    src, ckpt = os.path.join(tmp, "church.safetensors"), os.path.join(tmp, "church_ema.ckpt")
    save_safetensors(src, diff)
    rc, err = convert(src, ckpt, "church-256")
    source = open(ckpt + ".source").read() if os.path.exists(ckpt + ".source") else ""
    check("convert_official.py --model church-256 converts the file, and .source names google/ddpm-church-256",
          rc == 0 and os.path.exists(ckpt) and "google/ddpm-church-256" in source, f"exit {rc}: {err}")
    if rc == 0:
        # PyTorch in float32 here: in float64 this forward alone takes a minute on 2 cores
        eps_matches(model, ckpt, 1, os.path.join(tmp, "eps256.ref"), "at 256x256, batch 1, from the converted church-256",
                    double=False)
        os.unlink(ckpt)
    # another model's file, named as such
    cases = [("the church-256 file converted as cifar10-32", src, None, "pass --model church-256"),
             ("the cifar10-32 file converted as church-256", os.path.join(tmp, "model.safetensors"), "church-256",
              "pass --model cifar10-32")]
    save_safetensors(cases[1][1], cifar)
    for what, f, model_name, word in cases:
        out = os.path.join(tmp, "never.ckpt")
        rc, err = convert(f, out, model_name)
        check(f"refused in one line: {what}", rc == 1 and len(err.splitlines()) == 1 and word in err
              and not os.path.exists(out), f"exit {rc}: {err}")
    with open(src, "r+b") as f:   # cut in place: a second 455 MB file would only cost time
        f.truncate(os.path.getsize(src) - 4096)
    out = os.path.join(tmp, "never.ckpt")
    rc, err = convert(src, out, "church-256")
    check("refused in one line naming it: a truncated 256x256 file", rc == 1 and len(err.splitlines()) == 1
          and "truncated" in err and not os.path.exists(out), f"exit {rc}: {err}")
    os.unlink(src)


def main():
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    cfg = dict(PRESETS["paper"], dropout=0.0)
    model = build_model(cfg).eval()
    randomize(model, torch.Generator().manual_seed(7))
    diff = diffusers_state(model, 4)
    fix = fixture_keys()
    check("the fixture lists the paper model's 328 tensors, 35,746,307 values",
          len(fix) == 328 and sum(int(np.prod(s)) for s in fix.values()) == 35_746_307,
          f"{len(fix)} tensors, {sum(int(np.prod(s)) for s in fix.values())} values")
    bad = sorted(set(fix) ^ set(diff)) + [k for k in fix if k in diff and tuple(diff[k].shape) != fix[k]]
    check("the test's renamed PyTorch model has exactly the fixture's keys and shapes", not bad, str(bad[:5]))

    tmp = tempfile.mkdtemp(prefix="official.")
    src, ckpt = os.path.join(tmp, "model.safetensors"), os.path.join(tmp, "cifar10_ema.ckpt")
    save_safetensors(src, diff)
    rc0, err = convert(src, ckpt)
    rc = rc0
    check("convert_official.py converts the file", rc == 0 and os.path.exists(ckpt) and os.path.exists(ckpt + ".source"),
          f"exit {rc}: {err}")
    if rc == 0:
        eps_matches(model, ckpt, 2, os.path.join(tmp, "eps.ref"), "from the converted checkpoint")
        # diffusers' newer attention names (to_q, to_k, to_v, to_out.0) give the same checkpoint
        new = {re.sub(r"\.query\.", ".to_q.", re.sub(r"\.key\.", ".to_k.", re.sub(r"\.value\.", ".to_v.",
               re.sub(r"\.proj_attn\.", ".to_out.0.", k)))): v for k, v in diff.items()}
        src2, ckpt2 = os.path.join(tmp, "new.safetensors"), os.path.join(tmp, "new.ckpt")
        save_safetensors(src2, new)
        rc2, err2 = convert(src2, ckpt2)
        same = rc2 == 0 and open(ckpt, "rb").read() == open(ckpt2, "rb").read()
        check("the newer attention names (to_q ... to_out.0) give the same checkpoint bytes", same, f"exit {rc2}: {err2}")

    first = next(k for k in diff if ".attentions." in k and k.endswith("query.weight"))
    cases = {
        "a missing tensor": (lambda: save_safetensors(src, {k: v for k, v in diff.items() if k != first}), first),
        "a wrong shape": (lambda: save_safetensors(src, dict(diff, **{first: diff[first][:, :8]})), first),
        "a misnamed tensor": (lambda: save_safetensors(src, {(k.replace("query", "querry") if k == first else k): v
                                                             for k, v in diff.items()}), first),
        "a wrong dtype": (lambda: save_safetensors(src, diff, dtype="F16"), "F16"),
        "an unexpected tensor": (lambda: save_safetensors(src, dict(diff, extra=np.zeros(3, np.float32))), "extra"),
        "a truncated body": (lambda: save_safetensors(src, diff, cut=1000), "truncated"),
        "a header length past the end": (lambda: save_safetensors(src, diff, header_len_extra=10 ** 9), "past the end"),
    }
    for what, (make, word) in cases.items():
        make()
        out = os.path.join(tmp, "never.ckpt")
        rc, err = convert(src, out)
        check(f"refused, in one line naming it: {what}",
              rc == 1 and len(err.splitlines()) == 1 and word in err and not os.path.exists(out), f"exit {rc}: {err}")
    # diffusers' older .bin (a pickled state_dict, read with weights_only) gives the same bytes
    if rc0 == 0:
        binf, ckpt3 = os.path.join(tmp, "diffusion_pytorch_model.bin"), os.path.join(tmp, "bin.ckpt")
        torch.save({k: torch.from_numpy(v) for k, v in diff.items()}, binf)
        rc3, err3 = convert(binf, ckpt3)
        check("a .bin state_dict gives the same checkpoint bytes as the .safetensors",
              rc3 == 0 and open(ckpt, "rb").read() == open(ckpt3, "rb").read(), f"exit {rc3}: {err3}")
        download_script(tmp, binf, ckpt)
        with open(binf, "r+b") as f:
            f.truncate(os.path.getsize(binf) // 2)
        rc3, err3 = convert(binf, os.path.join(tmp, "never.ckpt"))
        check("a truncated .bin is refused in one line", rc3 == 1 and len(err3.splitlines()) == 1 and "Traceback"
              not in err3, f"exit {rc3}: {err3}")
        os.unlink(binf)
    lsun_layout(tmp, diff)
    hostile(tmp, diff)
    fuzz_header(tmp)
    subprocess.run(["rm", "-rf", tmp])
    n_fail = results.count(False)
    print(f"{len(results) - n_fail} passed, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
