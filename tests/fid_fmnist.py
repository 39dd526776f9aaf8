#!/usr/bin/python3
"""FID-FMNIST: a Frechet distance for Fashion-MNIST samples, computed offline.

The paper's FID (§4, Table 1) is the Frechet distance between Gaussians fitted to
Inception-v3 features of samples and of real images. Inception's weights cannot be
downloaded here, and they were trained on photographs, not on 32x32 grey garments. This
tool uses the standard substitute for MNIST-like data: the 128 features of the
penultimate layer of a small CNN trained on the Fashion-MNIST training set. It is not FID,
and its numbers are not comparable with FID or with another classifier's: each score line
names the classifier by the first digits of its weights' SHA-256.

  fid_fmnist.py score FILE.npz [FILE.npz ...] [-n N]   samples from `ddpm sample --npz`
  fid_fmnist.py sanity [-n 2000]                       what real and corrupted images score
  fid_fmnist.py selftest                               the formulas, without training

The classifier is trained on first use (about three minutes on one core, deterministically:
fixed seed, one thread) and cached in data/fid-fmnist/; delete that folder to train it
again. The reference statistics are those of the 60,000 training images. A Frechet
distance from N samples is biased upwards by an amount that shrinks with N, so compare
scores at the same N only; `sanity` prints how much the score of real images varies
between disjoint sets of N.
"""
import argparse, hashlib, os, sys, time, zipfile

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DATA = os.path.join(ROOT, "data", "fashion-mnist")
CACHE = os.path.join(ROOT, "data", "fid-fmnist")
RECIPE = "lenet-16-32-128 seed 0, Adam 1e-3, 3 epochs of batch 128, 1 thread, v1"


def fail(msg):
    print(f"fid_fmnist.py: {msg}", file=sys.stderr)
    sys.exit(1)


# ---- Fashion-MNIST, as ddpm.c reads it: 28x28 bytes centred in 32x32 zeros ----

def load_idx_images(path):
    try:
        b = open(path, "rb").read()
    except OSError as e:
        fail(f"{path}: {e.strerror}; run 'make fashion-mnist' (Debian's dataset-fashion-mnist)")
    if len(b) < 16 or int.from_bytes(b[:4], "big") != 0x803:
        fail(f"{path}: not an IDX image file; run 'make fashion-mnist' again")
    n, h, w = (int.from_bytes(b[4 * i:4 * i + 4], "big") for i in (1, 2, 3))
    if (h, w) != (28, 28) or len(b) != 16 + n * h * w:
        fail(f"{path}: expected {n} images of 28x28, the file holds {len(b) - 16} bytes")
    x = np.zeros((n, 32, 32), np.uint8)
    x[:, 2:30, 2:30] = np.frombuffer(b, np.uint8, offset=16).reshape(n, 28, 28)
    return x


def load_idx_labels(path):
    b = open(path, "rb").read()
    return np.frombuffer(b, np.uint8, offset=8).astype(np.int64)


def fashion_mnist(split):
    pre = "train" if split == "train" else "t10k"
    return (load_idx_images(os.path.join(DATA, f"{pre}-images-idx3-ubyte")),
            load_idx_labels(os.path.join(DATA, f"{pre}-labels-idx1-ubyte")))


def load_npz(path):
    # arr_0, uint8, N x H x W x C, as `ddpm sample --npz` and numpy.savez write it
    try:
        with np.load(path) as z:
            if "arr_0" not in z:
                fail(f"{path}: no arr_0 in it; write it with ./ddpm sample --npz FILE")
            a = z["arr_0"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        fail(f"{path}: not a readable .npz ({e}); write it with ./ddpm sample --npz FILE")
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (32, 32, 1):
        fail(f"{path}: arr_0 is {a.dtype} {a.shape}; expected uint8 N x 32 x 32 x 1 (Fashion-MNIST samples)")
    return a[..., 0]


# ---- the classifier ----

def torch_setup():
    import torch
    torch.set_num_threads(1)   # one thread: the same sums in the same order every time
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    return torch


def lenet(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),     # 16 x 16 x 16
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),    # 32 x 8 x 8
        nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(),            # the 128 features
        nn.Linear(128, 10))


def as_input(torch, x):
    # uint8 (N, 32, 32) -> float (N, 1, 32, 32) in [-1, 1], the scaling of §3.3
    return torch.from_numpy(x.astype(np.float32)[:, None] / 127.5 - 1.0)


def train_classifier(torch, path):
    x, y = fashion_mnist("train")
    xt, yt = fashion_mnist("test")
    net = lenet(torch)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = np.random.default_rng(0)
    t0 = time.time()
    for epoch in range(3):
        order = g.permutation(len(x))
        net.train()
        for k in range(0, len(x), 128):
            i = order[k:k + 128]
            loss = torch.nn.functional.cross_entropy(net(as_input(torch, x[i])), torch.from_numpy(y[i]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = (predict(torch, net, xt) == yt).mean()
        print(f"classifier: epoch {epoch + 1}/3, test accuracy {acc:.4f}, {time.time() - t0:.0f} s",
              file=sys.stderr, flush=True)
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"recipe": RECIPE, "state": net.state_dict(), "test_accuracy": float(acc)}, tmp)
    os.replace(tmp, path)


def predict(torch, net, x):
    net.eval()
    with torch.no_grad():
        return np.concatenate([net(as_input(torch, x[k:k + 1000])).argmax(1).numpy() for k in range(0, len(x), 1000)])


class Features:
    def __init__(self):
        self.torch = torch = torch_setup()
        path = os.path.join(CACHE, "lenet.pt")
        ok = False
        if os.path.exists(path):
            try:
                ok = torch.load(path)["recipe"] == RECIPE
            except Exception:
                ok = False
        if not ok:
            print(f"classifier: training one into {path} (once; about three minutes on one core)", file=sys.stderr, flush=True)
            train_classifier(torch, path)
        ck = torch.load(path)
        self.net = lenet(torch)
        self.net.load_state_dict(ck["state"])
        self.net.eval()
        self.accuracy = ck["test_accuracy"]
        self.id = hashlib.sha256(open(path, "rb").read()).hexdigest()[:12]
        self._ref = None

    def __call__(self, x):
        # uint8 (N, 32, 32) -> float64 (N, 128): the penultimate layer
        body = self.net[:-1]
        with self.torch.no_grad():
            return np.concatenate([body(as_input(self.torch, x[k:k + 1000])).double().numpy()
                                   for k in range(0, len(x), 1000)])

    def reference(self):
        # mean and covariance of the 60,000 training images, cached beside the weights
        if self._ref is None:
            path = os.path.join(CACHE, f"train_stats_{self.id}.npz")
            if not os.path.exists(path):
                mu, cov = stats(self(fashion_mnist("train")[0]))
                np.savez(path + ".tmp.npz", mu=mu, cov=cov)
                os.replace(path + ".tmp.npz", path)
            with np.load(path) as z:
                self._ref = (z["mu"], z["cov"])
        return self._ref


# ---- the Frechet distance ----

def stats(f):
    return f.mean(0), np.cov(f, rowvar=False)


def frechet(mu1, cov1, mu2, cov2):
    # ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)). The eigenvalues of C1 C2 are those of
    # the symmetric S C2 S with S = C1^(1/2), so Tr (C1 C2)^(1/2) = sum sqrt(eig(S C2 S)).
    w, v = np.linalg.eigh(cov1)
    s = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    e = np.linalg.eigvalsh(s @ cov2 @ s)
    d = mu1 - mu2
    return float(d @ d + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(np.clip(e, 0, None)).sum())


def score(feat, x):
    return frechet(*stats(feat(x)), *feat.reference())


def bootstrap_sd(feat, x, rounds, seed=0):
    # The spread of the score over resamplings (with replacement) of the N samples: how
    # much it would move with another set of N from the same model. (Resampling repeats
    # images, which biases each score up; the spread is what is used.)
    f, ref, g = feat(x), feat.reference(), np.random.default_rng(seed)
    return float(np.std([frechet(*stats(f[g.integers(0, len(f), len(f))]), *ref) for _ in range(rounds)], ddof=1))


# ---- commands ----

def cmd_score(a):
    feat = Features()
    for path in a.files:
        x = load_npz(path)
        if a.n:
            if len(x) < a.n:
                fail(f"{path}: {len(x)} samples, fewer than -n {a.n}")
            x = x[:a.n]
        sd = f"  bootstrap sd {bootstrap_sd(feat, x, a.bootstrap):.3f} ({a.bootstrap} resamplings)" if a.bootstrap else ""
        print(f"FID-FMNIST {score(feat, x):10.3f}  {path} ({len(x)} samples against the 60000 training "
              f"images; classifier {feat.id}){sd}")


def blur(x, sigma):
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    f = x.astype(np.float64)
    for axis in (1, 2):
        f = np.apply_along_axis(lambda v: np.convolve(np.pad(v, r, mode="edge"), k, "valid"), axis, f)
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def noise(x, std, g):
    return np.clip(np.rint(x + g.normal(0, 255 * std, x.shape)), 0, 255).astype(np.uint8)


def cmd_sanity(a):
    feat = Features()
    test = fashion_mnist("test")[0]
    n = a.n
    if not 1 < n <= len(test) // 2:
        fail(f"-n {n}: expected 2 to {len(test) // 2} (two disjoint sets of the 10000 test images)")
    g = np.random.default_rng(0)
    print(f"FID-FMNIST sanity: sets of {n} images against the 60000 training images; classifier {feat.id} "
          f"(test accuracy {feat.accuracy:.4f})")
    sets = [test[k:k + n] for k in range(0, len(test) - n + 1, n)]
    real = [score(feat, s) for s in sets]
    print(f"  test images, {len(sets)} disjoint sets: " + " ".join(f"{v:.3f}" for v in real) +
          f"  (mean {np.mean(real):.3f}, std {np.std(real, ddof=1):.3f})")
    print(f"  bootstrap sd of the first set:    {bootstrap_sd(feat, sets[0], 50):.3f}  (50 resamplings; beside the std above)")
    print(f"  all 10000 test images:        {score(feat, test):10.3f}")
    base = sets[0]
    for sigma in (0.5, 1.0, 2.0):
        print(f"  blurred, sigma {sigma:3.1f} pixels:     {score(feat, blur(base, sigma)):10.3f}")
    for std in (0.05, 0.1, 0.2, 0.4):
        print(f"  Gaussian noise, std {std:4.2f}:     {score(feat, noise(base, std, g)):10.3f}")
    print(f"  uniform noise images:         {score(feat, g.integers(0, 256, base.shape, dtype=np.uint8)):10.3f}")


def cmd_selftest(a):
    passed = failed = 0

    def check(name, ok, detail):
        nonlocal passed, failed
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        passed += bool(ok)
        failed += not ok

    g = np.random.default_rng(1)
    A = g.normal(size=(6, 6)); c1 = A @ A.T + 0.1 * np.eye(6)
    B = g.normal(size=(6, 6)); c2 = B @ B.T + 0.1 * np.eye(6)
    m1, m2 = g.normal(size=6), g.normal(size=6)
    d0 = frechet(m1, c1, m1, c1)
    check("the distance of a Gaussian to itself is 0", abs(d0) < 1e-9, f"{d0:.3e}")
    da, db = np.diag(g.uniform(0.1, 2, 6)), np.diag(g.uniform(0.1, 2, 6))
    want = float((m1 - m2) @ (m1 - m2) + ((np.sqrt(np.diag(da)) - np.sqrt(np.diag(db))) ** 2).sum())
    got = frechet(m1, da, m2, db)
    check("diagonal covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2", abs(got - want) < 1e-9 * want,
          f"{got:.12f} vs {want:.12f}")
    # Tr (C1 C2)^(1/2) by another route: the square root of C1 C2 by Denman-Beavers iteration
    y, z = c1 @ c2, np.eye(6)
    for _ in range(60):
        y, z = 0.5 * (y + np.linalg.inv(z)), 0.5 * (z + np.linalg.inv(y))
    want = float((m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(y))
    got = frechet(m1, c1, m2, c2)
    check("full covariances: the same as Denman-Beavers' square root of C1 C2", abs(got - want) < 1e-8 * abs(want),
          f"{got:.10f} vs {want:.10f}")
    check("symmetric in its two arguments", abs(frechet(m2, c2, m1, c1) - got) < 1e-8 * abs(got),
          f"{frechet(m2, c2, m1, c1):.10f} vs {got:.10f}")
    x = g.integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    os.makedirs(os.path.join(ROOT, "tests", "out"), exist_ok=True)
    path = os.path.join(ROOT, "tests", "out", "fid_selftest.npz")
    np.savez(path, x)
    check("reads numpy.savez's arr_0 as N x 32 x 32", (load_npz(path) == x[..., 0]).all(), f"{path}")
    b = blur(x[..., 0], 1.0)
    check("blur keeps a constant image and smooths noise", (blur(np.full((1, 32, 32), 77, np.uint8), 1.0) == 77).all()
          and b.std() < x.std(), f"std {x.std():.1f} -> {b.std():.1f}")
    print(f"{passed} passed, {failed} failed")
    return failed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="score .npz files of samples")
    s.add_argument("files", nargs="+")
    s.add_argument("-n", type=int, default=0, help="use the first N samples of each file")
    s.add_argument("--bootstrap", type=int, default=0, metavar="B",
                   help="also the score's spread over B resamplings of the samples")
    s = sub.add_parser("sanity", help="scores of real and corrupted test images")
    s.add_argument("-n", type=int, default=2000)
    sub.add_parser("selftest", help="check the formulas (no training)")
    a = p.parse_args()
    if a.cmd == "selftest":
        sys.exit(1 if cmd_selftest(a) else 0)
    {"score": cmd_score, "sanity": cmd_sanity}[a.cmd](a)


if __name__ == "__main__":
    main()
