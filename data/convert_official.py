#!/usr/bin/python3
"""Converts the paper's models, as diffusers publishes them, into ddpm.c checkpoints.

  convert_official.py WEIGHTS OUT.ckpt [--model NAME] [--ddpm ./ddpm] [--keep-exchange FILE.ref]

WEIGHTS is a diffusers diffusion_pytorch_model.safetensors (or .bin, read with
python3-torch) of one of the paper's models, NAME (default cifar10-32):

  cifar10-32     google/ddpm-cifar10-32: the official TensorFlow checkpoint
                 model.ckpt-790000's EMA weights; ddpm.c's `paper` preset (35,746,307
                 parameters, Appendix B)
  church-256, bedroom-256, cat-256, celebahq-256
                 google/ddpm-{church,bedroom,cat,celebahq}-256: the LSUN and CelebA-HQ
                 models (§4, Table 1); ddpm.c's `paper256` preset (113,673,219 parameters)

diffusers renamed the official weights (scripts/convert_ddpm_original_checkpoint_to_diffusers.py):

  ddpm.c (= tests/reference.py)          diffusers
  temb.dense0 / temb.dense1              time_embedding.linear_1 / linear_2
  down.i.block.j.{norm1,conv1,norm2,     down_blocks.i.resnets.j.{norm1,conv1,norm2,
      conv2,temb_proj,nin_shortcut}          conv2,time_emb_proj,conv_shortcut}
  down.i.attn.j.{norm,q,k,v,proj_out}    down_blocks.i.attentions.j.{group_norm,query,key,
                                             value,proj_attn} (or to_q, to_k, to_v, to_out.0)
  down.i.downsample.conv                 down_blocks.i.downsamplers.0.conv
  mid.block_1, mid.attn_1, mid.block_2   mid_block.resnets.0, attentions.0, resnets.1
  up.i.*                                 up_blocks.(L - 1 - i).*, upsample -> upsamplers.0
  norm_out                               conv_norm_out

(L levels: 4 at 32x32, where attention is in down block 1 and up block 2; 6 at 256x256,
where it is in down block 4 and up block 1.) diffusers stores the attention's 1x1
convolutions as linear layers, (C, C) instead of (C, C, 1, 1): the same numbers in the
same order. Its time embedding (flip_sin_to_cos false, freq_shift 1), its GroupNorm
(eps 1e-6) and its stride-2 downsampling (downsample_padding 0: no padding before, one
row and column after, TensorFlow's "SAME") are the official ones at both sizes, so
nothing else changes. A safetensors file is read with the standard library (an 8-byte
little-endian header length, a JSON header, then raw little-endian tensors) and refused,
naming the first problem, if a tensor is missing, unexpected, misshapen or not float32,
if the file is cut short, or if it is another model's layout. The weights go into an
exchange file (ddpm.c section 21) that `./ddpm import` turns into the checkpoint;
OUT.ckpt.source beside it records where they came from.
"""
import hashlib, json, os, signal, stat, struct, subprocess, sys, tempfile

PAPER = dict(in_ch=3, ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16], groups=32, img=32)
PAPER256 = dict(in_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2, attn_resolutions=[16], groups=32,
                img=256)
LSUN_SOURCE = ("the official TensorFlow checkpoint of the paper's {what} model (EMA weights; Ho, Jain, Abbeel 2020, "
               "scripts/run_{script}.py, unet2d16b2c112244), as converted by diffusers; the training step is not "
               "in the file")
# name -> the network, its objective, its ddpm.c preset and batch, and where it came from.
# var: 0 fixedlarge (sigma^2 = beta, the CIFAR-10 model's sampler), 1 fixedsmall (beta
# tilde: the official code's first GaussianDiffusion, which sampled the 256x256 models).
MODELS = {
    "cifar10-32": dict(config=PAPER, dropout=0.1, var=0, step=790000, preset="paper", batch=128,
                       params=35_746_307, repo="google/ddpm-cifar10-32",
                       source="converted from the official TensorFlow checkpoint "
                              "diffusion_cifar10_model/model.ckpt-790000 (EMA weights; Ho, Jain, Abbeel 2020)"),
}
for _name, _what, _script in (("church", "LSUN Church", "lsun"), ("bedroom", "LSUN Bedroom", "lsun"),
                               ("cat", "LSUN Cat", "lsun"), ("celebahq", "CelebA-HQ", "celebahq")):
    MODELS[_name + "-256"] = dict(config=PAPER256, dropout=0.0, var=1, step=None, preset="paper256", batch=64,
                                  params=113_673_219, repo=f"google/ddpm-{_name}-256",
                                  source=LSUN_SOURCE.format(what=_what, script=_script))
MAX_HEADER = 100 << 20     # the real header is 40 kB; a larger length is a corrupt file
TEMPS = []                 # files this run is writing: removed on any failure or signal


class Refused(Exception):
    """A one-line reason; main prints it and exits 1, having removed what it wrote."""


def fail(msg):
    raise Refused(msg)


def read_regular(path):
    """The bytes of a regular file (a FIFO or a device is refused before it can block or
    run on forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            fail(f"{path} is not a regular file (a FIFO, device or folder); pass the file itself")
        head = f.read(8)
        if len(head) < 8:
            fail(f"{path} is not a safetensors file ({len(head)} bytes)")
        n = struct.unpack_from("<Q", head)[0]
        if n > min(MAX_HEADER, st.st_size - 8):
            fail(f"{path}: the header length {n} runs past the end of the file ({st.st_size} bytes) "
                 f"or past {MAX_HEADER} bytes; the file is truncated or not safetensors")
        return n, f.read(n), f.read()


def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        fail(f"the header names {sorted(k for k in set(keys) if keys.count(k) > 1)[0]!r} twice; the file is corrupt")
    return dict(pairs)


def whole(x):
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors(path):
    """name -> (dtype, shape, raw bytes); refuses anything malformed in one line."""
    n, hdr, body = read_regular(path)
    body = memoryview(body)
    try:
        header = json.loads(hdr, object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError):
        fail(f"{path}: the header is not JSON; is this a safetensors file?")
    except RecursionError:
        fail(f"{path}: the header's JSON is nested too deeply; the file is corrupt")
    if not isinstance(header, dict):
        fail(f"{path}: the header is not a JSON object")
    out, spans = {}, []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or not isinstance(t.get("dtype"), str) or not isinstance(t.get("shape"), list) \
                or not isinstance(t.get("data_offsets"), list) or len(t["data_offsets"]) != 2:
            fail(f"{path}: {name!r} has no dtype, shape or [begin, end] data_offsets")
        dtype, shape, (lo, hi) = t["dtype"], t["shape"], t["data_offsets"]
        if not all(whole(s) and 0 <= s < 1 << 31 for s in shape) or len(shape) > 8:
            fail(f"{path}: {name!r} has a shape that is not a list of at most 8 sizes")
        if not whole(lo) or not whole(hi):
            fail(f"{path}: {name!r} has data_offsets that are not whole numbers")
        size = 4 if dtype == "F32" else None
        if not 0 <= lo <= hi <= len(body):
            fail(f"{path}: {name!r} lies past the end of the file; the file is truncated")
        count = 1
        for s in shape:
            count *= s
        if size and hi - lo != count * size:
            fail(f"{path}: {name!r} holds {hi - lo} bytes, its shape {shape} needs {count * size}")
        spans.append((lo, hi, name))
        out[name] = (dtype, shape, body[lo:hi])   # a view: the 455 MB of a 256x256 model are not copied
    spans.sort()
    for (lo0, hi0, a), (lo1, hi1, b) in zip(spans, spans[1:]):
        if lo1 < hi0:
            fail(f"{path}: {a!r} and {b!r} overlap in the file; the file is corrupt")
    return out


def ddpm_tensors(c=PAPER):
    """(ddpm.c name, shape) for every tensor of the network, in the official layout."""
    ch, L, nrb = c["ch"], len(c["ch_mult"]), c["num_res_blocks"]
    t = [("temb.dense0.weight", [4 * ch, ch]), ("temb.dense0.bias", [4 * ch]),
         ("temb.dense1.weight", [4 * ch, 4 * ch]), ("temb.dense1.bias", [4 * ch]),
         ("conv_in.weight", [ch, c["in_ch"], 3, 3]), ("conv_in.bias", [ch])]

    def res(p, cin, cout):
        t.extend([(p + ".norm1.weight", [cin]), (p + ".norm1.bias", [cin]),
                  (p + ".conv1.weight", [cout, cin, 3, 3]), (p + ".conv1.bias", [cout]),
                  (p + ".temb_proj.weight", [cout, 4 * ch]), (p + ".temb_proj.bias", [cout]),
                  (p + ".norm2.weight", [cout]), (p + ".norm2.bias", [cout]),
                  (p + ".conv2.weight", [cout, cout, 3, 3]), (p + ".conv2.bias", [cout])])
        if cin != cout:
            t.extend([(p + ".nin_shortcut.weight", [cout, cin, 1, 1]), (p + ".nin_shortcut.bias", [cout])])

    def attn(p, C):
        t.extend([(p + ".norm.weight", [C]), (p + ".norm.bias", [C])])
        for k in ("q", "k", "v", "proj_out"):
            t.extend([(f"{p}.{k}.weight", [C, C, 1, 1]), (f"{p}.{k}.bias", [C])])

    skips, cur, res_ = [ch], ch, c["img"]
    for i, m in enumerate(c["ch_mult"]):
        for j in range(nrb):
            res(f"down.{i}.block.{j}", cur, ch * m)
            cur = ch * m
            if res_ in c["attn_resolutions"]:
                attn(f"down.{i}.attn.{j}", cur)
            skips.append(cur)
        if i != L - 1:
            t.extend([(f"down.{i}.downsample.conv.weight", [cur, cur, 3, 3]), (f"down.{i}.downsample.conv.bias", [cur])])
            skips.append(cur)
            res_ //= 2
    res("mid.block_1", cur, cur)
    attn("mid.attn_1", cur)
    res("mid.block_2", cur, cur)
    for i in reversed(range(L)):
        for j in range(nrb + 1):
            res(f"up.{i}.block.{j}", cur + skips.pop(), ch * c["ch_mult"][i])
            cur = ch * c["ch_mult"][i]
            if res_ in c["attn_resolutions"]:
                attn(f"up.{i}.attn.{j}", cur)
        if i != 0:
            t.extend([(f"up.{i}.upsample.conv.weight", [cur, cur, 3, 3]), (f"up.{i}.upsample.conv.bias", [cur])])
            res_ *= 2
    t.extend([("norm_out.weight", [cur]), ("norm_out.bias", [cur]),
              ("conv_out.weight", [c["in_ch"], cur, 3, 3]), ("conv_out.bias", [c["in_ch"]])])
    return t


ATTN = {"norm": ["group_norm"], "q": ["query", "to_q"], "k": ["key", "to_k"], "v": ["value", "to_v"],
        "proj_out": ["proj_attn", "to_out.0"]}
RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "temb_proj": "time_emb_proj",
       "nin_shortcut": "conv_shortcut"}


def diffusers_names(name, L=len(PAPER["ch_mult"])):
    """The diffusers names a ddpm.c tensor may have (attention: old and new spellings)."""
    p = name.split(".")
    leaf = p[-1]
    if p[0] == "temb":
        return [f"time_embedding.linear_{1 if p[1] == 'dense0' else 2}.{leaf}"]
    if p[0] == "norm_out":
        return [f"conv_norm_out.{leaf}"]
    if p[0] in ("conv_in", "conv_out"):
        return [name]
    if p[0] == "mid":
        base = {"block_1": "mid_block.resnets.0", "block_2": "mid_block.resnets.1", "attn_1": "mid_block.attentions.0"}[p[1]]
        rest = p[2:-1]
    else:
        i = int(p[1]) if p[0] == "down" else L - 1 - int(p[1])
        kind = {"block": "resnets", "attn": "attentions"}.get(p[2])
        if kind is None:   # downsample.conv, upsample.conv
            return [f"{p[0]}_blocks.{i}.{p[2][:-6]}samplers.0.conv.{leaf}"]
        base = f"{p[0]}_blocks.{i}.{kind}.{p[3]}"
        rest = p[4:-1]
    layer = rest[0]
    if "attentions" in base:
        return [f"{base}.{a}.{leaf}" for a in ATTN[layer]]
    return [f"{base}.{RES[layer]}.{leaf}"]


def layout(tensors, m):
    """The tensor names model m's file must hold (one per ddpm.c tensor, in the spelling
    the file uses), or None if a tensor of m has no name in the file."""
    names = []
    for name, _ in ddpm_tensors(m["config"]):
        cands = [d for d in diffusers_names(name, len(m["config"]["ch_mult"])) if d in tensors]
        if not cands:
            return None
        names.append(cands[0])
    return names if len(names) == len(tensors) else None


def known_layout(tensors):
    """The models whose layout (names and shapes) this file has, as words for a message."""
    same = []
    for key, m in MODELS.items():
        names = layout(tensors, m)
        if names and all(tensors[d][1] == (shape[:2] if ".attentions." in d and shape[2:] == [1, 1] else shape)
                         for d, (_, shape) in zip(names, ddpm_tensors(m["config"]))):
            same.append(key)
    return same


def convert(tensors, model="cifar10-32"):
    """ddpm.c name -> (shape, raw float32 bytes), checked against the model's network."""
    m = MODELS[model]
    c, L = m["config"], len(m["config"]["ch_mult"])
    others = [k for k in known_layout(tensors) if MODELS[k]["config"] is not c]
    if others:
        fail(f"this is the layout of {' / '.join(others)}, not of {model} "
             f"({len(c['ch_mult'])} levels at {c['img']}x{c['img']}); pass --model {others[0]}")
    out, used = {}, set()
    for name, shape in ddpm_tensors(c):
        cands = [d for d in diffusers_names(name, L) if d in tensors]
        if not cands:
            fail(f"no tensor {diffusers_names(name, L)[0]} (ddpm.c's {name}); is this {m['repo']}?")
        d = cands[0]
        dtype, dshape, raw = tensors[d]
        want = shape[:2] if ".attentions." in d and shape[2:] == [1, 1] else shape
        if dtype != "F32":
            fail(f"{d} is {dtype}; only float32 (F32) files are converted")
        if dshape != want:
            fail(f"{d} has shape {dshape}, {m['repo']}'s model needs {want}")
        out[name] = (shape, raw)
        used.add(d)
    extra = sorted(set(tensors) - used)
    if extra:
        fail(f"{extra[0]} is not a tensor of {m['repo']}'s model ({len(extra)} unexpected); is this {m['repo']}?")
    return out


def read_bin(path):
    """A diffusers .bin (a PyTorch state_dict, pickled in a zip) as read_safetensors
    gives it, read with python3-torch without running the pickle's code (weights_only)."""
    try:
        st = os.stat(path)
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    if not stat.S_ISREG(st.st_mode):
        fail(f"{path} is not a regular file (a FIFO, device or folder); pass the file itself")
    try:
        import torch
    except ImportError:
        fail(f"{path}: a .bin file needs python3-torch (apt-get install python3-torch), or pass the .safetensors")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001 -- torch raises many kinds for a bad file
        fail(f"{path}: not a PyTorch state_dict that can be read safely ({type(e).__name__}); is it truncated?")
    if not isinstance(sd, dict):
        fail(f"{path}: holds a {type(sd).__name__}, not a state_dict")
    out = {}
    for name, t in sd.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            fail(f"{path}: {name!r} is not a named tensor")
        dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(t.dtype, str(t.dtype))
        raw = t.contiguous().numpy().astype("<f4").tobytes() if dtype == "F32" else b""
        out[name] = (dtype, list(t.shape), raw)
    return out


def not_special(path):
    """An output must be a regular file or absent: a FIFO or a device would be replaced by a file."""
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        fail(f"{path} exists and is not a regular file; not replacing it")


def write_atomic(path, chunks):
    """Writes path through path.tmp, flushed to disk, then renamed: never a half file."""
    not_special(path)
    tmp = path + ".tmp"
    TEMPS.append(tmp)
    try:   # made anew, as ddpm.c's PATH.tmp: a FIFO or a link planted there is removed, never opened
        if os.path.lexists(tmp):
            os.unlink(tmp)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        fail(f"could not write {path}: {e.strerror}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        TEMPS.remove(tmp)


def exchange_bytes(weights, model="cifar10-32"):
    """The exchange file (ddpm.c section 21) of the model's network with these weights."""
    m = MODELS[model]
    config, recs = m["config"], []

    def rec(name, shape, raw):
        b = name.encode()
        recs.append(struct.pack("<i", len(b)) + b + struct.pack(f"<i{len(shape)}i", len(shape), *shape))
        recs.append(raw)   # written as it is, not copied into the record

    def ints(name, v):
        rec(name, [len(v)], struct.pack(f"<{len(v)}f", *v))

    for k in ("in_ch", "ch", "num_res_blocks", "groups", "img"):
        ints("config." + k, [config[k]])
    ints("config.ch_mult", config["ch_mult"])
    ints("config.attn_resolutions", config["attn_resolutions"])
    ints("config.objective", [0, m["var"], 0])   # eps, the official sampler's variance, L_simple
    rec("config.dropout", [1], struct.pack("<f", m["dropout"]))
    if m["step"] is not None:
        ints("meta.step", [m["step"]])           # model.ckpt-790000
    for name, (shape, raw) in weights.items():
        rec("param." + name, shape, raw)
    return [b"DDPMREF1" + struct.pack("<i", len(recs) // 2)] + recs


def folder_of(path, what):
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        fail(f"{what} {path}: the folder {d} does not exist; create it first")


def run(argv):
    args, ddpm, keep, model = [], os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ddpm"), None, \
        "cifar10-32"
    it = iter(argv)
    for a in it:
        if a == "--ddpm":
            ddpm = next(it, None)
        elif a == "--keep-exchange":
            keep = next(it, None)
        elif a == "--model":
            model = next(it, None)
        else:
            args.append(a)
    if len(args) != 2 or ddpm is None or keep == "" or model is None or "" in args:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if model not in MODELS:
        fail(f"--model {model}: unknown; the models are {', '.join(MODELS)}")
    m = MODELS[model]
    src, out = args
    if not os.access(ddpm, os.X_OK):
        fail(f"--ddpm {ddpm}: no such program; build it (make) or pass its path")
    folder_of(out, "OUT")
    if keep:
        folder_of(keep, "--keep-exchange")
        not_special(keep)
    not_special(out + ".source")
    if os.path.exists(out):
        fail(f"{out} already exists; remove it or pass another path")
    weights = convert(read_bin(src) if src.endswith(".bin") else read_safetensors(src), model)
    n = sum(len(raw) // 4 for _, raw in weights.values())
    if n != m["params"]:
        fail(f"{src} holds {n} parameters, {m['repo']}'s model {m['params']:,}")
    with open(src, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    source = (f"{os.path.basename(src)} sha256 {sha}\n"
              f"{m['repo']} (diffusers), {m['source']}\n"
              f"converted by data/convert_official.py --model {model}: {len(weights)} tensors, {n} parameters\n").encode()
    try:
        tmpdir = tempfile.mkdtemp(prefix="convert_official.")
    except OSError as e:
        fail(f"cannot make a temporary folder ({e.strerror or e}); set TMPDIR to a writable folder with "
             f"{n * 4 // 1000000 + 10} MB free")
    try:
        ref = keep or os.path.join(tmpdir, "official.ref")
        write_atomic(ref, exchange_bytes(weights, model))
        # out did not exist: whatever is there after a failure is this run's, removed with
        # what a killed import leaves
        TEMPS.extend([out + ".tmp", out])
        r = subprocess.run([ddpm, "import", "--weights", ref, "--out", out, "--model", m["preset"],
                            "--batch", str(m["batch"])], capture_output=True, text=True)
        if r.returncode and "interrupted" in r.stderr:   # Ctrl-C reached ./ddpm before this process saw it
            raise KeyboardInterrupt
        if r.returncode:
            fail(f"./ddpm import: {r.stderr.strip()}")
        write_atomic(out + ".source", [source])
        TEMPS.remove(out)
    finally:
        if not keep and os.path.exists(os.path.join(tmpdir, "official.ref")):
            os.unlink(os.path.join(tmpdir, "official.ref"))
        os.rmdir(tmpdir)
    print(f"wrote {out} ({model}: {len(weights)} tensors, {n:,} parameters, from {src}) and {out}.source")
    return 0


def interrupted(sig, frame):
    raise KeyboardInterrupt


def main(argv):
    """run(), with every failure, signal and full disk ending in one line and nothing left."""
    signal.signal(signal.SIGTERM, interrupted)
    code, msg = 1, None
    try:
        return run(argv)
    except Refused as e:
        msg = str(e)
    except KeyboardInterrupt:
        code, msg = 130, "interrupted; nothing written"
    except (OSError, MemoryError) as e:
        msg = f"{getattr(e, 'strerror', None) or e or type(e).__name__}"
    for t in TEMPS:
        try:
            os.unlink(t)
        except OSError:
            pass
    print(f"convert_official.py: {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
