#!/usr/bin/env python3
"""Helpers of tests/test_e2e.sh, standard library only: they write the synthetic datasets,
edit checkpoints and exchange files (re-sealing their checksums) and read the .npy, .npz
and .csv files ./ddpm writes.

    /usr/bin/python3 tests/e2e_tool.py COMMAND ARGS...

Commands: mkdata DIR, xor FILE OFFSET MASK, checksum FILE, nan IN OUT, reseal IN OUT
OFFSET FORMAT VALUE..., exset/exdup/exdrop/exrename IN OUT NAME [VALUES|NEW], byte/u64 FILE OFFSET, big IN OUT,
exmut IN OUT MODE, npy FILE SHAPE, trace_t FILE, per_t CSV TOTAL
L_T ROWS, recon NPY K, interp NPY L, npz NPZ NPY (each is described where it is handled).
An assertion that fails exits non-zero with its message, which the shell test reports.
"""
import ast, math, os, struct, sys

def fnv(b, h=0xcbf29ce484222325):
    for x in b:
        h = ((h ^ x) * 0x100000001b3) & 0xffffffffffffffff
    return h

def records(path):
    """An exchange file (ddpm.c section 21) as a list of (name, the record's bytes)."""
    b = open(path, "rb").read()
    assert b[:8] == b"DDPMREF1"
    n, pos, recs = struct.unpack_from("<i", b, 8)[0], 12, []
    for _ in range(n):
        k = struct.unpack_from("<i", b, pos)[0]
        name = b[pos + 4:pos + 4 + k]
        nd = struct.unpack_from("<i", b, pos + 4 + k)[0]
        shape = struct.unpack_from("<%di" % nd, b, pos + 8 + k)
        end = pos + 8 + k + 4 * nd + 4 * math.prod(shape)
        recs.append((name, b[pos:end]))
        pos = end
    return recs

cmd = sys.argv[1]
if cmd == "mkdata":
    # 4 structured 32x32 RGB images (not noise) in CIFAR-10's binary format: a horizontal
    # gradient, a vertical gradient, two colour halves, a checkerboard of 8x8 blocks.
    # Every training file holds the same 4 records (ddpm.c refuses empty files).
    d = os.path.join(sys.argv[2], "cifar-10-batches-bin")
    os.makedirs(d, exist_ok=True)
    recs = b""
    for k in range(4):
        r = bytearray([k])
        for c in range(3):
            for y in range(32):
                for x in range(32):
                    if k == 0: v = x * 8
                    elif k == 1: v = 255 - y * 8
                    elif k == 2: v = 230 if (x < 16) == (c == 0) else 20
                    else: v = 255 if (x // 8 + y // 8) % 2 else 0
                    r.append(v)
        recs += bytes(r)
    for n in ["data_batch_%d.bin" % i for i in range(1, 6)] + ["test_batch.bin"]:
        open(os.path.join(d, n), "wb").write(recs)
elif cmd == "xor":          # FILE OFFSET MASK (OFFSET "mid": the middle of the file)
    b = bytearray(open(sys.argv[2], "rb").read())
    off = len(b) // 2 if sys.argv[3] == "mid" else int(sys.argv[3])
    b[off] ^= int(sys.argv[4], 0)
    open(sys.argv[2], "wb").write(b)
elif cmd == "checksum":     # FILE: exit 0 if the trailing FNV-1a 64 matches (format as in ddpm.c section 20)
    b = open(sys.argv[2], "rb").read()
    sys.exit(0 if fnv(b[:-8]) == struct.unpack("<Q", b[-8:])[0] else 1)
elif cmd == "nan":          # IN OUT: the live parameters set to NaN, checksum re-sealed
    b = bytearray(open(sys.argv[2], "rb").read())
    n = struct.unpack_from("<Q", b, 152)[0]      # header: n_params is its last field
    assert len(b) == 160 + 16 * n + 8
    b[160:160 + 4 * n] = struct.pack("<f", float("nan")) * n
    b[-8:] = struct.pack("<Q", fnv(b[:-8]))
    open(sys.argv[3], "wb").write(b)
elif cmd == "reseal":       # IN OUT OFFSET FORMAT VALUE ...: header fields edited, checksum re-sealed
    b = bytearray(open(sys.argv[2], "rb").read())
    args = sys.argv[4:]
    for i in range(0, len(args), 3):
        struct.pack_into("<" + args[i + 1], b, int(args[i]), int(args[i + 2], 0))
    b[-8:] = struct.pack("<Q", fnv(b[:-8]))
    open(sys.argv[3], "wb").write(b)
elif cmd in ("exset", "exdup", "exdrop", "exrename"):
    # exset IN OUT NAME V,V,...: record NAME (1-D float32; "nan" allowed) set or appended
    # exdup IN OUT NAME: record NAME twice;  exdrop IN OUT PREFIX: records starting so dropped
    # exrename IN OUT NAME NEW: record NAME renamed NEW (Python escapes such as \x1b allowed)
    recs = records(sys.argv[2])
    name = sys.argv[4].encode("latin1").decode("unicode_escape").encode("latin1")
    if cmd == "exset":
        vals = [float(v) for v in sys.argv[5].split(",")]
        rec = struct.pack("<i", len(name)) + name + struct.pack("<ii", 1, len(vals)) + struct.pack("<%df" % len(vals), *vals)
        idx = [i for i, r in enumerate(recs) if r[0] == name]
        if idx: recs[idx[0]] = (name, rec)
        else: recs.append((name, rec))
    elif cmd == "exdup":
        recs += [r for r in recs if r[0] == name]
    elif cmd == "exrename":
        new = sys.argv[5].encode("latin1").decode("unicode_escape").encode("latin1")
        recs = [(new, struct.pack("<i", len(new)) + new + r[1][4 + len(r[0]):]) if r[0] == name else r for r in recs]
    else:
        recs = [r for r in recs if not r[0].startswith(name)]
    open(sys.argv[3], "wb").write(b"DDPMREF1" + struct.pack("<i", len(recs)) + b"".join(r[1] for r in recs))
elif cmd == "byte":         # FILE OFFSET: print one byte of a file
    print(open(sys.argv[2], "rb").read()[int(sys.argv[3])])
elif cmd == "u64":          # FILE OFFSET: print a little-endian uint64 of a file
    print(struct.unpack_from("<Q", open(sys.argv[2], "rb").read(), int(sys.argv[3]))[0])
elif cmd == "big":          # IN OUT: the EMA weights times 1e38 (finite, but the network overflows), re-sealed
    b = bytearray(open(sys.argv[2], "rb").read())
    n = struct.unpack_from("<Q", b, 152)[0]
    ema = struct.unpack_from("<%df" % n, b, 160 + 4 * n)
    struct.pack_into("<%df" % n, b, 160 + 4 * n, *[v * 1e38 for v in ema])
    b[-8:] = struct.pack("<Q", fnv(b[:-8]))
    open(sys.argv[3], "wb").write(b)
elif cmd == "exmut":        # IN OUT MODE: an exchange file's records reversed, one renamed,
    recs = records(sys.argv[2])         # one dropped, one doubled, or the file cut short
    mode = sys.argv[4]
    i = next(j for j, r in enumerate(recs) if r[0].startswith(b"param.") and b"conv1.weight" in r[0])
    if mode == "reverse": recs.reverse()
    elif mode == "rename": recs[i] = (b"", recs[i][1].replace(b"conv1.weight", b"conv9.weight", 1))
    elif mode == "drop": del recs[i]
    elif mode == "double": recs.insert(i, recs[i])
    out = b"DDPMREF1" + struct.pack("<i", len(recs)) + b"".join(r[1] for r in recs)
    open(sys.argv[3], "wb").write(out[:len(out) // 2] if mode == "cut" else out)
elif cmd == "npy":          # FILE SHAPE: a float32 .npy of that shape, all finite
    b = open(sys.argv[2], "rb").read()
    want = tuple(int(s) for s in sys.argv[3].split(","))
    assert b[:6] == b"\x93NUMPY", "bad magic %r" % b[:6]
    major = b[6]
    hl = struct.unpack_from("<H" if major == 1 else "<I", b, 8)[0]
    start = 10 + hl if major == 1 else 12 + hl
    hd = ast.literal_eval(b[start - hl:start].decode("latin1"))
    assert hd["descr"] == "<f4" and not hd["fortran_order"], hd
    assert tuple(hd["shape"]) == want, "shape %r, want %r" % (hd["shape"], want)
    assert len(b) - start == 4 * math.prod(want), "data is %d bytes" % (len(b) - start)
    assert start % 64 == 0, "header not 64-byte aligned"
    vals = struct.unpack_from("<%df" % math.prod(want), b, start)
    assert all(math.isfinite(v) for v in vals), "non-finite values"
    try:
        import numpy as np
    except ImportError:
        print("numpy not importable: checked the header by hand")
        sys.exit(0)
    a = np.load(sys.argv[2])
    assert a.shape == want and a.dtype == np.float32 and np.isfinite(a).all()
    print("numpy.load: shape", a.shape)
elif cmd == "trace_t":      # FILE: the trace's t values run from T = 1000 down to 1
    b = open(sys.argv[2], "rb").read()
    hl = struct.unpack_from("<H", b, 8)[0]
    n = (len(b) - 10 - hl) // 4
    t = struct.unpack_from("<%df" % n, b, 10 + hl)
    assert t[0] == 1000 and t[-1] == 1 and all(x > y for x, y in zip(t, t[1:])), t
elif cmd in ("per_t", "recon", "interp", "npz"):
    def load(path):         # a float32 .npy (version 1.0) as (shape, flat tuple)
        b = open(path, "rb").read()
        hl = struct.unpack_from("<H", b, 8)[0]
        shape = tuple(ast.literal_eval(b[10:10 + hl].decode("latin1"))["shape"])
        return shape, struct.unpack_from("<%df" % math.prod(shape), b, 10 + hl)
    def rmse(a, b):         # on the 0..255 scale
        return 127.5 * math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)) / len(a))
    if cmd == "per_t":      # CSV TOTAL L_T ROWS: the columns of bpd --per-t (ddpm.c section 11)
        rows = [l.split(",") for l in open(sys.argv[2]).read().split("\n") if l]
        assert rows[0] == ["t", "term_bpd", "rate_bpd", "distortion_rmse"], rows[0]
        v = [[float(x) for x in r] for r in rows[1:]]
        assert len(v) == int(sys.argv[5]), "%d rows" % len(v)
        total, prior = float(sys.argv[3]), float(sys.argv[4])
        s = prior + sum(r[1] for r in v)
        assert abs(s - total) < 2e-6, "terms + L_T = %.7f, bpd printed %.7f" % (s, total)
        assert all(a[2] >= b[2] for a, b in zip(v, v[1:])), "rate rises somewhere in t"
        assert abs(v[0][2] + v[0][1] - total) < 2e-6 and abs(v[-1][2] - prior) < 2e-6, "rate ends"
        assert v[0][3] < v[-1][3], "distortion %.2f at t = 1, %.2f at t = T" % (v[0][3], v[-1][3])
        print("sum %.6f = total %.6f; distortion %.2f at t = %d, %.2f at t = %d" % (s, total, v[0][3], v[0][0], v[-1][3], v[-1][0]))
    elif cmd == "recon":    # NPY K: row 0 (t = 1) within 4 levels of x_0; row 1 (t = T) samples differ
        shape, a = load(sys.argv[2])
        k = int(sys.argv[3]); cols = k + 2; n = math.prod(shape[2:])
        assert shape[:2] == (2, cols), shape
        img = lambda r, c: a[(r * cols + c) * n:(r * cols + c + 1) * n]
        worst = max(rmse(img(0, 2 + j), img(0, 0)) for j in range(k))
        spread = max(abs(x - y) for x, y in zip(img(1, 2), img(1, 3)))
        assert worst < 4 and spread > 0.1, "t = 1: worst RMSE %.2f levels; t = T: spread %.3f" % (worst, spread)
        print("t = 1: worst RMSE %.2f levels; t = T: samples differ by up to %.3f" % (worst, spread))
    elif cmd == "npz":      # NPZ NPY: arr_0 is the float samples as uint8 N x H x W x C, rounded
        import zipfile
        z = zipfile.ZipFile(sys.argv[2])
        assert z.namelist() == ["arr_0.npy"] and z.testzip() is None, z.namelist()
        b = z.read("arr_0.npy")
        hl = struct.unpack_from("<H", b, 8)[0]
        d = ast.literal_eval(b[10:10 + hl].decode("latin1"))
        shape, (N, C, H, W) = tuple(d["shape"]), load(sys.argv[3])[0]
        assert d["descr"] == "|u1" and shape == (N, H, W, C), (d, (N, C, H, W))
        _, x = load(sys.argv[3])
        f32 = lambda v: struct.unpack("<f", struct.pack("<f", v))[0]
        bad = 0
        for i in range(N):
            for c in range(C):
                for y in range(H):
                    for w in range(W):
                        v = f32(x[((i * C + c) * H + y) * W + w] + 1.0) * 127.5 + 0.5
                        want = min(255, max(0, math.floor(v)))
                        got = b[10 + hl + ((i * H + y) * W + w) * C + c]
                        tie = abs(v - round(v)) < 1e-3   # float rounding may go either way here
                        bad += got != want and not (tie and abs(got - want) <= 1)
        assert bad == 0, "%d pixels differ from the samples' .npy" % bad
        print("arr_0 %s uint8 = the samples' .npy, channels last" % (shape,))
    else:                   # NPY L: t = 1: lambda = 0 decodes near x_0, lambda = 1 near x'_0
        shape, a = load(sys.argv[2])
        L = int(sys.argv[3]); cols = L + 2; n = math.prod(shape[2:])
        img = lambda r, c: a[(r * cols + c) * n:(r * cols + c + 1) * n]
        ea, eb = rmse(img(0, 1), img(0, 0)), rmse(img(0, L), img(0, L + 1))
        mid = rmse(img(0, 1 + L // 2), img(0, 0))
        assert ea < 4 and eb < 4 and mid > ea, "RMSE %.2f (A), %.2f (B), middle %.2f" % (ea, eb, mid)
        print("t = 1: lambda 0 vs A %.2f, lambda 1 vs B %.2f, middle vs A %.2f levels" % (ea, eb, mid))
