#!/bin/sh
# Downloads the paper's own CIFAR-10 model (the official TensorFlow checkpoint
# model.ckpt-790000's EMA weights, as diffusers publishes them: google/ddpm-cifar10-32)
# and converts it into data/official/cifar10_ema.ckpt with data/convert_official.py.
# Offline, it says so in one line and exits 0, like `make cifar10 --optional`.
#
# The files' sha256 could not be pinned: the machine this was written on cannot reach
# huggingface.co. The first download prints them; put them into
# data/official-weights.sha256 (sha256sum format) and later downloads are checked
# against them. The converter checks every tensor's name, shape and type regardless.
cd "$(dirname "$0")" || exit 1
BASE=https://huggingface.co/google/ddpm-cifar10-32/resolve/main
OUT=official/cifar10_ema.ckpt
[ -f $OUT ] && { echo "$OUT exists"; exit 0; }
offline() { rmdir official 2>/dev/null; echo "make official-weights: $1; run it again when online (nothing was changed)"; exit 0; }
if command -v curl >/dev/null 2>&1; then
    curl -fsIL --connect-timeout 15 -o /dev/null "$BASE/config.json" 2>/dev/null || offline "no connection to huggingface.co"
elif command -v wget >/dev/null 2>&1; then
    wget -q -T 15 --spider "$BASE/config.json" 2>/dev/null || offline "no connection to huggingface.co"
else
    offline "neither curl nor wget is installed"
fi
mkdir -p official || exit 1
for f in diffusion_pytorch_model.safetensors config.json; do
    [ -f official/$f ] && continue
    echo "downloading $BASE/$f$([ $f = config.json ] || echo " (143 MB)")"
    if command -v curl >/dev/null 2>&1; then
        curl -fL --connect-timeout 15 -o official/$f.part "$BASE/$f" || { rm -f official/$f.part; offline "no connection to huggingface.co"; }
    elif command -v wget >/dev/null 2>&1; then
        wget -q -T 15 -O official/$f.part "$BASE/$f" || { rm -f official/$f.part; offline "no connection to huggingface.co"; }
    else
        offline "neither curl nor wget is installed"
    fi
    mv official/$f.part official/$f
done
if [ -f official-weights.sha256 ]; then
    (cd official && sha256sum -c --quiet ../official-weights.sha256) ||
        { echo "make official-weights: sha256 mismatch against data/official-weights.sha256; delete data/official/ and download again" >&2; exit 1; }
else
    echo "sha256 of the downloads (not pinned yet; see the top of data/get_official_weights.sh):"
    (cd official && sha256sum diffusion_pytorch_model.safetensors config.json)
fi
[ -x ../ddpm ] || { echo "make official-weights: build ./ddpm first (make)" >&2; exit 1; }
${PYTHON:-python3} convert_official.py official/diffusion_pytorch_model.safetensors $OUT --ddpm ../ddpm || exit 1
