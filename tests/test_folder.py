#!/usr/bin/env python3
"""Training on a folder of pictures (ddpm.c section 19.1) and micro-batches (--accumulate),
end to end: ./ddpm (or $DDPM) on pictures this script writes with PIL. Prints
"N passed, N failed".

    /usr/bin/python3 tests/test_folder.py
    FOLDER_DECODE_ONLY=1 DDPM=build/ddpm_san ... tests/test_folder.py   (make sanitize: parts 1-3,
                                                  the pictures, the cache and bad input, only)

The pixels are checked against PIL doing the same four steps (composite over white,
grey or RGB, centre square, Catmull-Rom resize = PIL's BICUBIC). Away from the edges (two
pixels in) they agree within 2 levels of 255: PIL rounds and clips to 8 bits between its
horizontal and vertical pass, stb_image_resize keeps floats. At the edges, where the
filter reaches past the picture, PIL drops the missing taps and renormalises while stb
repeats the edge pixel: within 8 levels there, and 0.5 on average over the picture.
(Measured: interior at most 2, edges at most 6, mean 0.21 at 32 px and 0.30 at 16 px.)
"""
import glob, os, shutil, struct, subprocess, sys
import numpy as np
from PIL import Image

DDPM = os.environ.get("DDPM", "./ddpm")
T = "tests/out/folder"
shutil.rmtree(T, ignore_errors=True)
os.makedirs(T)
passed = failed = 0

def check(name, ok, detail=""):
    global passed, failed
    if ok: passed += 1; print("PASS", name)
    else: failed += 1; print("FAIL", name, (": " + detail) if detail else "")

def run(*args, env=None):
    try: p = subprocess.run([DDPM, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    except subprocess.TimeoutExpired as e: return 124, "", "timed out (a hang): %s" % (e.stderr or b"")[-200:]
    return p.returncode, p.stdout, p.stderr

rng = np.random.default_rng(1)

def smooth(h, w, c):
    """Smooth random content with some structure: bilinear-enlarged noise."""
    a = (rng.random((h // 4 + 2, w // 4 + 2, c)) * 255).astype(np.uint8)
    im = Image.fromarray(a[..., 0] if c == 1 else a).resize((w, h), Image.BILINEAR)
    return np.array(im)

def write_pictures(d):
    """Every format and shape the loader meets; returns the number of pictures."""
    os.makedirs(d + "/sub/deep", exist_ok=True)
    Image.fromarray(smooth(60, 80, 3)).save(d + "/a_rgb.png")                             # non-square
    Image.fromarray(np.dstack([smooth(64, 64, 3), smooth(64, 64, 1)]), "RGBA").save(d + "/b_rgba.png")
    Image.fromarray(smooth(70, 50, 1), "L").save(d + "/c_grey.png")
    g16 = smooth(40, 40, 1).astype(np.uint16) * 257 + rng.integers(0, 256, (40, 40)).astype(np.uint16)
    Image.fromarray(g16, "I;16").save(d + "/d_grey16.png")                                # 16-bit
    Image.fromarray(np.dstack([smooth(48, 48, 1), smooth(48, 48, 1)]), "LA").save(d + "/e_la.png")
    Image.fromarray(smooth(90, 100, 3)).save(d + "/f_photo.JPG", quality=95, subsampling=0)   # upper case
    Image.fromarray(smooth(47, 33, 3)).save(d + "/g.bmp")
    Image.fromarray(smooth(36, 36, 3)).convert("P", palette=Image.ADAPTIVE).save(d + "/h.gif")
    Image.fromarray(smooth(40, 44, 3)).save(d + "/sub/deep/i.tga")                        # nested
    Image.fromarray(smooth(35, 35, 3)).save(d + "/sub/j.ppm")
    Image.fromarray(smooth(128, 160, 3)).save(d + "/k_big.png")
    open(d + "/notes.txt", "w").write("not a picture\n")                                  # ignored
    open(d + "/.hidden.png", "wb").write(b"not a png")                                    # hidden: skipped
    os.makedirs(d + "/.git", exist_ok=True)
    open(d + "/.git/x.png", "wb").write(b"not a png")
    return 11

def reference(path, N, C, bg=255):
    """The four steps of ddpm.c section 19.1, in PIL."""
    im = Image.open(path)
    im.seek(0)
    if im.mode.startswith("I"):   # 16-bit grey: stb_image keeps the high byte
        im = Image.fromarray((np.array(im).astype(np.uint32) >> 8).astype(np.uint8), "L")
    base = Image.new("RGBA", im.size, (bg, bg, bg, 255))
    rgb = Image.alpha_composite(base, im.convert("RGBA")).convert("RGB")
    img = rgb.convert("L") if C == 1 else rgb
    w, h = img.size
    s = min(w, h); l = (w - s) // 2; t = (h - s) // 2
    a = np.array(img.crop((l, t, l + s, t + s)).resize((N, N), Image.BICUBIC))
    return a[None] if C == 1 else a.transpose(2, 0, 1)

def caches(dd):
    return sorted(glob.glob(dd + "/cache/*.pix"))

def cache_pixels(path):
    b = open(path, "rb").read()
    n, c, side = struct.unpack_from("<3i", b, 16)
    return np.frombuffer(b, np.uint8, n * c * side * side, 4096).reshape(n, c, side, side)

def pictures(d):
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        out += [os.path.join(root, f) for f in files if not f.startswith(".") and not f.endswith(".txt")]
    return sorted(out)

def decode(d, dd, *flags):   # --steps 0: read the folder, build the network, train nothing
    shutil.rmtree(T + "/run0", ignore_errors=True)
    return run("--data", d, "--data-dir", dd, "--steps", 0, "--batch", 2, "--run", T + "/run0", "--sample-n", 0, *flags)

def one_line_error(name, r, want, lo=1, hi=127):
    """Exit lo..hi and one error line, the last, that says want (progress may come before it)."""
    rc, out, err = r
    lines = err.strip().splitlines()
    errors = [l for l in lines if l.startswith("ddpm")]
    check(name, lo <= rc <= hi and len(errors) == 1 and lines[-1] == errors[0] and want in errors[0],
          "exit %d, stderr %r" % (rc, err[-300:]))

# 1. The pixels, against PIL.
P, DD = T + "/pics", T + "/dd"
n = write_pictures(P)
rc, out, err = decode(P, DD, "--img", 32)
check("a mixed folder decodes (PNG 8/16-bit, RGBA, LA, grey, JPEG, BMP, GIF, TGA, PPM)", rc == 0 and "decoded 11 pictures" in err, err[-400:])
files = pictures(P)
check("11 pictures, sorted; hidden files, .git and notes.txt left out, and notes.txt counted",
      len(files) == n and len(caches(DD)) == 1 and "1 files that are not pictures" in err, err[-300:])
if rc == 0 and caches(DD):
    px = cache_pixels(caches(DD)[0])
    for i, f in enumerate(files):
        d = np.abs(reference(f, 32, 3).astype(int) - px[i].astype(int))
        inner = int(d[:, 2:-2, 2:-2].max())
        check("%s equals PIL's within the tolerance (interior %d, edges %d, mean %.2f)" % (
              os.path.relpath(f, P), inner, d.max(), d.mean()), inner <= 2 and d.max() <= 8 and d.mean() <= 0.5)
rc, out, err = decode(P, DD, "--img", 16, "--in-ch", 1)
if rc == 0:
    px = cache_pixels([c for c in caches(DD) if "16px-grey" in c][0])
    d = np.array([np.abs(reference(f, 16, 1).astype(int) - px[i].astype(int)) for i, f in enumerate(files)])
    check("--in-ch 1 at 16 px: luma, within the tolerance (interior %d, edges %d, mean %.2f)" % (
          d[..., 2:-2, 2:-2].max(), d.max(), d.mean()), px.shape[1] == 1 and d[..., 2:-2, 2:-2].max() <= 2
          and d.max() <= 8 and d.mean() <= 0.5)
else:
    check("--in-ch 1 at 16 px decodes", False, err)
G = T + "/grey"
os.makedirs(G)
for i in range(3): Image.fromarray(smooth(40, 40, 1), "L").save(G + "/%d.png" % i)
Image.fromarray(np.dstack([smooth(40, 40, 1)] * 2), "LA").save(G + "/la.png")
rc, out, err = decode(G, DD, "--img", 32)
check("a folder of grey pictures trains a 1-channel network", rc == 0 and "32x32, 1 channels" in err, err[-300:])
rc, out, err = run("--data", P, "--data-dir", DD, "--img", 64, "--steps", 1, "--batch", 4, "--ch", 8, "--groups", 4,
                   "--run", T + "/mixed64", "--sample-n", 0)
check("tiny trains a step at 64 px on the mixed folder; pictures smaller than 64 are enlarged, with a warning "
      "that counts them", rc == 0 and "warning: 8 pictures of" in err and "smaller than 64x64" in err
      and os.path.exists(T + "/mixed64/model.ckpt"), err[-300:])

# 2. The cache: reused, rebuilt on any change, never trusted when damaged.
C2 = T + "/dd2"
shutil.copytree(P, T + "/p2")
P2 = T + "/p2"
rc, _, err1 = decode(P2, C2, "--img", 32)
cache = caches(C2)[0]
mtime = os.stat(cache).st_mtime_ns
rc, _, err2 = decode(P2, C2, "--img", 32)
check("a second run maps the cache without decoding", rc == 0 and "decoded" in err1 and "decod" not in err2
      and os.stat(cache).st_mtime_ns == mtime, err2[-300:])
st = os.stat(P2 + "/g.bmp")
os.utime(P2 + "/g.bmp", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
rc, _, err = decode(P2, C2, "--img", 32)
check("a touched picture rebuilds the cache", rc == 0 and "the folder or the settings changed" in err and "decoded 11" in err, err[-300:])
Image.fromarray(smooth(32, 32, 3)).save(P2 + "/sub/new.png")
rc, _, err = decode(P2, C2, "--img", 32)
check("an added picture rebuilds it", rc == 0 and "decoded 12" in err, err[-300:])
os.remove(P2 + "/a_rgb.png")
rc, _, err = decode(P2, C2, "--img", 32)
check("a removed picture rebuilds it", rc == 0 and "decoded 11" in err, err[-300:])
rc, _, err = decode(P2, C2, "--img", 32, "--background", 0)
check("another --background is another cache", rc == 0 and "decoded 11" in err and len(caches(C2)) == 2, err[-300:])
for what, edit, want in [("a flipped pixel", lambda b: b.__setitem__(len(b) - 5, b[len(b) - 5] ^ 1), "checksum"),
                         ("a damaged header", lambda b: b.__setitem__(20, b[20] ^ 0x40), "header is damaged"),
                         ("a truncated cache", lambda b: b.__delitem__(slice(len(b) - 100, None)), "size does not match"),
                         ("a cache that claims 2^30 pictures", None, "size does not match")]:
    b = bytearray(open(cache, "rb").read())
    if edit: edit(b)
    else:   # n = 2^30 with its header checksum re-sealed: only the file's size gives it away
        struct.pack_into("<i", b, 16, 1 << 30)
        h = 0xcbf29ce484222325
        for x in b[:48]: h = ((h ^ x) * 0x100000001b3) & 0xffffffffffffffff
        struct.pack_into("<Q", b, 48, h)
    open(cache, "wb").write(b)
    rc, _, err = decode(P2, C2, "--img", 32)
    check("%s is refused and rebuilt" % what, rc == 0 and want in err and "decoded 11" in err, err[-300:])

# 3. Bad input: one line, exit 1..127, nothing written.
def bad_folder(name, make):
    d = T + "/bad_" + name
    os.makedirs(d)
    make(d)
    return d
def good(d, k=2):
    for i in range(k): Image.fromarray(smooth(32, 32, 3)).save(d + "/ok%d.png" % i)
def nothing_written(dd):
    return not glob.glob(dd + "/cache/*.pix") and not glob.glob(dd + "/cache/*.tmp") and not os.path.exists(T + "/run0/model.ckpt")
png = open(P + "/a_rgb.png", "rb").read()
jpg = open(P + "/f_photo.JPG", "rb").read()
cases = [
    ("a truncated PNG", lambda d: (good(d), open(d + "/t.png", "wb").write(png[:len(png) // 2])), [], "t.png"),
    ("a zero-byte JPEG", lambda d: (good(d), open(d + "/z.jpg", "wb").close()), [], "z.jpg: an empty file"),
    ("a truncated JPEG", lambda d: (good(d), open(d + "/t.jpg", "wb").write(jpg[:len(jpg) // 2])), [], "t.jpg"),
    ("a directory named x.png (and nothing else)", lambda d: os.makedirs(d + "/x.png"), [], "holds no pictures"),
    ("a symbolic link loop", lambda d: (good(d), os.symlink("..", d + "/loop")), [], "symbolic link loop"),
    ("a folder without pictures", lambda d: open(d + "/readme.txt", "w").close(), [], "holds no pictures"),
    ("fewer pictures than the batch", lambda d: good(d, 1), [], "fewer than 2 (--batch)"),
    ("a FIFO named p.png", lambda d: (good(d), os.mkfifo(d + "/p.png")), [], "p.png: not a regular file"),
]
for name, make, flags, want in cases:
    d = bad_folder(name.split()[-1].strip("()") + str(len(os.listdir(T))), make)
    dd = d + "_dd"
    one_line_error(name + ": one line naming it", decode(d, dd, "--img", 32, *flags), want)
    check(name + ": nothing written", nothing_written(dd))
one_line_error("a file as --data", decode(P + "/g.bmp", DD), "is a file, not a folder")
one_line_error("a missing folder as --data", decode(T + "/nowhere", DD), "No such file")
for flag, want in [(("--img", 48), "power of two"), (("--img", 512), "from 16 to 256"), (("--img", 8), "from 16 to 256"),
                   (("--in-ch", 2), "grey (1) or RGB (3)"), (("--model", "paper", "--img", 64), "32x32 network")]:
    one_line_error(" ".join(map(str, flag)) + ": refused", decode(P, T + "/dd_flags", *flag), want, 2, 2)
one_line_error("--img 64 on cifar10: refused", run("--data", "cifar10", "--img", 64), "--img resizes a folder", 2, 2)
d = bad_folder("skip", lambda d: (good(d, 3), open(d + "/t.png", "wb").write(png[:100]), open(d + "/z.jpg", "wb").close()))
rc, _, err = decode(d, T + "/dd_skip", "--skip-bad")
check("--skip-bad skips and counts unreadable pictures", rc == 0 and "2 unreadable pictures skipped" in err
      and "decoded 3 pictures" in err, err[-300:])

# 3b. Hardening III (issue 36): each check is named after its defect. Its pictures come
# from a stream of their own: the later sections' pictures stay what they were.
rng_before, rng = rng, np.random.default_rng(36)
ASAN = bool(os.environ.get("FOLDER_DECODE_ONLY"))   # the sanitizer build: its memory is not the program's
def peak(*args, limit_fsize=None):
    """./ddpm ARGS in its own process: (exit, peak RSS in MB, stderr)."""
    code = ("import resource, signal, subprocess, sys\n"
            "def lim():\n"
            "    if %r: signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (%r, %r))\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True, preexec_fn=lim)\n"
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
            "sys.stdout.write(r.stderr)\n") % (limit_fsize, limit_fsize, limit_fsize)
    p = subprocess.run([sys.executable, "-c", code, DDPM, *map(str, args)], capture_output=True, text=True)
    head, _, err = p.stdout.partition("\n")
    rc, mb = map(int, head.split())
    return rc, mb, err
def psd(w, h, pixels=b""):   # Photoshop: 8-bit RGB, raw
    return (b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3) + struct.pack(">IIIH", 0, 0, 0, 0) + pixels)
def hdr(w, h, pixels=b""):   # Radiance: flat RGBE pixels
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y %d +X %d\n" % (h, w) + pixels
def png_header(w, h):
    import zlib
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
F = T + "/formats"
os.makedirs(F)
im = smooth(64, 64, 3)
Image.fromarray(im).save(F + "/p.bmp"); Image.fromarray(im).convert("P", palette=Image.ADAPTIVE).save(F + "/p.gif")
Image.fromarray(im).save(F + "/p.ppm"); Image.fromarray(im[..., 0], "L").save(F + "/p.pgm")
Image.fromarray(im).save(F + "/p.tga"); Image.fromarray(im).save(F + "/p_rle.tga", compression="tga_rle")
open(F + "/p.psd", "wb").write(psd(64, 64, im.transpose(2, 0, 1).tobytes()))
open(F + "/p.hdr", "wb").write(hdr(64, 64, np.dstack([im, np.full((64, 64), 128, np.uint8)]).tobytes()))
formats = sorted(os.listdir(F))
rc, _, err = decode(F, T + "/dd_formats", "--img", 32)
check("#36.2 whole pictures of every format a folder may hold still decode (%s)" % " ".join(formats),
      rc == 0 and "decoded %d pictures" % len(formats) in err, err[-300:])
for f in formats:
    whole = open(F + "/" + f, "rb").read()
    for frac in (0.5, 0.95):
        name = f.replace(".", "_cut%d." % (frac * 100))
        d = bad_folder(name.replace(".", "_"), lambda d: (good(d), open(d + "/" + name, "wb").write(whole[:int(len(whole) * frac)])))
        one_line_error("#36.2 %s cut at %d%%: refused as cut short, naming it" % (f, frac * 100),
                       decode(d, d + "_dd", "--img", 32), name + ": cut short")
    d = bad_folder(f.replace(".", "_skip"), lambda d: (good(d, 3), open(d + "/" + f, "wb").write(whole[:len(whole) // 2])))
    rc, _, err = decode(d, d + "_dd", "--img", 32, "--skip-bad")
    check("#36.2 %s cut at 50%% with --skip-bad: skipped and counted" % f, rc == 0 and "1 unreadable pictures skipped" in err
          and "decoded 3 pictures" in err, err[-300:])
tiny_jpg = T + "/tiny.jpg"
Image.fromarray(smooth(16, 16, 3)).save(tiny_jpg, quality=90)
j = bytearray(open(tiny_jpg, "rb").read())
sof = j.index(b"\xff\xc0")
struct.pack_into(">HH", j, sof + 5, 8192, 8192)
headers = {"h.ppm": b"P6\n8192 8192\n255\n", "h.tga": struct.pack("<BBB5xHHHHBB", 0, 0, 2, 0, 0, 8192, 8192, 24, 0),
           "h.psd": psd(8192, 8192), "h.hdr": hdr(8192, 8192),
           "h.bmp": b"BM" + struct.pack("<IIIIiiHHIIiiII", 54, 0, 54, 40, 8192, 8192, 1, 24, 0, 0, 0, 0, 0, 0),
           "h.jpg": bytes(j)}
for f, b in headers.items():
    d = bad_folder(f.replace(".", "_head"), lambda d: (good(d), open(d + "/" + f, "wb").write(b)))
    rc, mb, err = peak("--data", d, "--data-dir", d + "_dd", "--steps", 0, "--batch", 2, "--run", T + "/run0",
                       "--sample-n", 0, "--img", 32, "--threads", 2)
    one_line_error("#36.2 a %d-byte %s that declares 8192x8192: refused, naming it" % (len(b), f[2:].upper()),
                   (rc, "", err), f + ": cut short or damaged")
    check("#36.2 ... before its pixels are allocated (%d MB)" % mb, ASAN or mb < 150)
d = bad_folder("skip_past_end", lambda d: (good(d), open(d + "/s.jpg", "wb").write(b"\xff\xd8\xff\xe0\x10\0JFIF\0\1\1")))
one_line_error("#36.2 a JPEG whose first segment runs past its end: refused as cut short, no hang",
               decode(d, d + "_dd", "--img", 32), "s.jpg: cut short")
for seed, word in (("crash_dht_overflow.jpg", "damaged"), ("crash_pnm_long_number.ppm", "damaged")):
    d = bad_folder(seed.split(".")[0], lambda d: (good(d), shutil.copy("tests/fuzz/pictures/" + seed, d)))
    one_line_error("#36.2 found by fuzz_pictures: %s, which stb_image 2.27 misreads, is refused first" % seed,
                   decode(d, d + "_dd", "--img", 32), seed + ": " + word)
d = bad_folder("huge_side", lambda d: (good(d), open(d + "/wide.png", "wb").write(png_header(40000, 40000))))
one_line_error("#36.2 a side above stb's limit: refused as too large, not as an unknown type",
               decode(d, d + "_dd", "--img", 32), "wide.png: too large")
if not ASAN:   # 5: two 8192x8192 16-bit RGB PNGs of 400 KB each; stb takes about 1 GB for one
    import zlib
    B5 = T + "/big16"
    os.makedirs(B5)
    row, z = b"\0" + b"\x12\x34" * (3 * 8192), zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(8192)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", 8192, 8192, 16, 2, 0, 0, 0)
    chunk = lambda t, dd: struct.pack(">I", len(dd)) + t + dd + struct.pack(">I", zlib.crc32(t + dd))
    big = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    for k in range(5):   # pictures 0 and 4 are big: each in one of the two threads' first chunks of 4
        if k % 4: Image.fromarray(smooth(32, 32, 3)).save(B5 + "/%d.png" % k)
        else: open(B5 + "/%d.png" % k, "wb").write(big)
    rc, mb, err = peak("--data", B5, "--data-dir", B5 + "_dd", "--steps", 0, "--batch", 2, "--run", T + "/run0",
                       "--sample-n", 0, "--img", 32, "--threads", 2)
    check("#36.5 two 8192x8192 16-bit RGB pictures at --threads 2 decode one at a time (%d MB; both at once take "
          "about 1,500)" % mb, rc == 0 and "decoded 5 pictures" in err and mb < 1200, err[-300:])
L8 = T + "/links"
os.makedirs(L8 + "/photos")
good(L8 + "/photos", 2)
os.symlink("photos", L8 + "/backup")
rc, _, err = decode(L8, T + "/dd_links", "--img", 32)
check("#36.8 a folder reached twice (backup -> photos): its pictures are read once, and that is said",
      rc == 0 and "decoded 2 pictures" in err and "1 folders reached again" in err, err[-300:])
DM = T + "/diamond"
os.makedirs(DM + "/d0")
good(DM + "/d0", 1)
for k in range(1, 15):
    os.makedirs(DM + "/d%d" % k)
    os.symlink("../d%d" % (k - 1), DM + "/d%d/a" % k)
    os.symlink("../d%d" % (k - 1), DM + "/d%d/b" % k)
rc, _, err = decode(DM + "/d14", T + "/dd_diamond", "--img", 32, "--batch", 1)
check("#36.8 a diamond of 28 links over one picture: 1 picture, not 2^14", rc == 0 and "decoded 1 pictures" in err, err[-300:])
for what, name in (("a newline and a forged line", "evil\nddpm: all is well.png"), ("an escape sequence", "\x1b[31mred.png")):
    d = bad_folder("esc%d" % len(name), lambda d: (good(d), open(d + "/" + name, "wb").write(b"not a picture")))
    rc, out, err = decode(d, d + "_dd", "--img", 32)
    one_line_error("#36.10 a bad picture whose name holds %s: one line" % what, (rc, out, err), "unknown image type")
    check("#36.10 ... printed escaped (\\x0a, \\x1b), no control bytes", "\x1b" not in err and
          ("\\x0a" in err or "\\x1b" in err), repr(err[-300:]))
FULL = T + "/full"
os.makedirs(FULL)
for k in range(40): Image.fromarray(smooth(32, 32, 3)).save(FULL + "/%d.png" % k)
rc, _, err = peak("--data", FULL, "--data-dir", T + "/dd_full", "--steps", 0, "--batch", 2, "--run", T + "/run0",
                  "--sample-n", 0, "--img", 32, limit_fsize=64 << 10)
one_line_error("#36.11 a --data-dir that fills up while the cache is written: the write's own reason",
               (rc, "", err), "File too large")
check("#36.11 ... not the reason of a later call (Inappropriate ioctl for device)", "ioctl" not in err, err[-200:])

# Defect 4: the cache cut short under a running training.
import time
S4, DD4, R4 = T + "/bus", T + "/dd_bus", T + "/bus_run"
os.makedirs(S4)
for i in range(8): Image.fromarray(smooth(32, 32, 3)).save(S4 + "/%d.png" % i)
B4 = ["--data", S4, "--data-dir", DD4, "--img", 16, "--ch", 8, "--groups", 4, "--batch", 2, "--sample-n", 0,
      "--sample-every", 10**6, "--run", R4, "--threads", 1]
p = subprocess.Popen([DDPM, *map(str, B4 + ["--steps", 10**6])], stderr=subprocess.PIPE, text=True)
t0 = time.time()
while time.time() - t0 < 60 and p.poll() is None and (not os.path.exists(R4 + "/log.csv") or
                                                      len(open(R4 + "/log.csv").read().splitlines()) < 4):
    time.sleep(0.02)
if caches(DD4): os.truncate(caches(DD4)[0], 4096)   # what another process rebuilding it in place would do
try: err = p.communicate(timeout=60)[1]
except subprocess.TimeoutExpired: p.kill(); err = p.communicate()[1]
one_line_error("#36.4 a cache truncated under a running training: one line naming it, not SIGBUS (exit 135)",
               (p.returncode, "", err), "bus-")
rows = len(open(R4 + "/log.csv").read().splitlines()) - 1 if os.path.exists(R4 + "/log.csv") else -1
saved = "checkpoint: %s/model.ckpt (step %d)" % (R4, rows)
rc, _, err2 = run(*B4, "--steps", rows + 1, "--resume")
check("#36.4 ... the checkpoint holds the last whole step (%d), and --resume decodes the folder anew and goes on" % rows,
      saved in err and rc == 0 and "decoded 8 pictures" in err2 and "at step %d" % rows in err2, (err + err2)[-400:])

rng = rng_before

if os.environ.get("FOLDER_DECODE_ONLY"):
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)

# 4. A network at each side, and evaluation on a folder.
S = T + "/sizes"
os.makedirs(S)
for i in range(8): Image.fromarray(smooth(256, 256, 3)).save(S + "/%d.png" % i)
NET = ["--ch", 8, "--groups", 4, "--batch", 2, "--sample-n", 0, "--data-dir", DD, "--lr", 1e-3, "--warmup", 1]
for side in (16, 64, 256):
    rc, out, err = run("params", "--model", "tiny", "--img", side)
    levels = {16: 2, 64: 4, 256: 6}[side]
    rc2, _, err2 = run("--data", S, "--img", side, "--steps", 1, "--run", "%s/run%d" % (T, side), *NET)
    check("tiny at %d px: %d levels, trains a step" % (side, levels),
          rc == 0 and out.count("downsample") == levels - 1 and rc2 == 0 and "%dx%d" % (side, side) in err2, err2[-300:])
rc, out, err = run("params", "--model", "tiny", "--img", 64)
check("params --img 64 prints the parameters and the activation memory per image",
      rc == 0 and "total" in out and "MiB per image" in out, out[-300:])
ck = T + "/run64/model.ckpt"
E = T + "/eval"
os.makedirs(E)
for i in range(3): Image.fromarray(smooth(80, 64, 3)).save(E + "/%d.png" % i)
rc, out, err = run("bpd", "--checkpoint", ck, "--data", E, "--data-dir", DD, "-n", 2, "--t-samples", 2)
check("bpd on a held-out folder", rc == 0 and "bits/dim" in out, err[-300:])
rc, out, err = run("reconstruct", "--checkpoint", ck, "--data", E, "--data-dir", DD, "--index", 2, "--t", 10, "-k", 1,
                   "--out", T + "/recon.png")
check("reconstruct from a folder", rc == 0 and os.path.exists(T + "/recon.png"), err[-300:])
rc, out, err = run("interpolate", "--checkpoint", ck, "--data", E, "--data-dir", DD, "--index", "0,1", "--t", 10,
                   "--lambdas", 2, "--out", T + "/interp.png")
check("interpolate in a folder", rc == 0 and os.path.exists(T + "/interp.png"), err[-300:])
one_line_error("--index past the folder: refused", run("reconstruct", "--checkpoint", ck, "--data", E, "--data-dir", DD,
               "--index", 3), "images 0 to 2", 2, 2)
small = bad_folder("small", lambda d: good(d, 3))
one_line_error("a 64 px checkpoint on a folder of 32 px pictures: refused",
               run("bpd", "--checkpoint", ck, "--data", small, "--data-dir", small + "_dd"), "smaller than the network's side")

# 5. --accumulate K: micro-batches are slices of the one batch (ddpm.c sections 9, 23).
A = ["--data", S, "--img", 16, "--ch", 8, "--groups", 4, "--batch", 8, "--sample-n", 0, "--data-dir", DD,
     "--lr", 1e-3, "--warmup", 2, "--sample-every", 100000]
def ckpt(name): return "%s/%s/model.ckpt" % (T, name)
def same(a, b): return open(ckpt(a), "rb").read() == open(ckpt(b), "rb").read()
def close(a, b):
    def arrays(p):
        raw = open(p, "rb").read()
        n = struct.unpack_from("<Q", raw, 152)[0]
        return np.frombuffer(raw, "<f4", 4 * n, 160).reshape(4, n)
    x, y = arrays(ckpt(a)), arrays(ckpt(b))
    return max(float(np.abs(x[i] - y[i]).max() / np.abs(x[i]).max()) for i in (0, 3))
r = {k: run(*A, "--steps", 5, "--run", "%s/acc%s" % (T, k), *(["--accumulate", k] if k else [])) for k in ("", 1, 4)}
check("--accumulate 1: the same bits as without it", all(v[0] == 0 for v in r.values()) and same("acc", "acc1"))
err = close("acc1", "acc4") if r[4][0] == 0 else 1
check("--accumulate 4 = one batch of 8 after 5 steps (parameters and EMA within 1e-6: %.1e)" % err,
      err < 1e-6 and "4 micro-batches of 2 images" in r[4][2], r[4][2][-300:])
rc1 = run(*A, "--steps", 3, "--run", T + "/accr", "--accumulate", 4)[0]
rc2, _, err = run(*A, "--steps", 5, "--run", T + "/accr", "--accumulate", 4, "--resume")
check("--accumulate 4 with --resume: the same bits as one run", rc1 == 0 and rc2 == 0 and same("accr", "acc4"), err[-300:])
rc1 = run(*A, "--steps", 3, "--run", T + "/accr2", "--accumulate", 2)[0]
rc2, _, err = run(*A, "--steps", 5, "--run", T + "/accr2", "--accumulate", 1, "--resume")
e = close("accr2", "acc1") if rc1 == rc2 == 0 else 1
check("resume may change --accumulate: the same steps, to rounding (%.1e)" % e, e < 1e-6, err[-300:])
one_line_error("--batch 8 --accumulate 3: refused", run(*A, "--accumulate", 3, "--run", T + "/acc3"), "equal slices", 2, 2)

print("%d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
