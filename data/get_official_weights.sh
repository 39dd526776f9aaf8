#!/bin/sh
# Downloads one of the paper's models as diffusers publishes it and converts it into a
# ddpm.c checkpoint with data/convert_official.py. MODEL (the first argument, or the
# environment, as `make official-weights MODEL=church-256` passes it):
#   cifar10-32 (default)  google/ddpm-cifar10-32: model.ckpt-790000's EMA weights, 143 MB
#                         -> data/official/cifar10_ema.ckpt (`paper` preset)
#   church-256, bedroom-256, cat-256, celebahq-256
#                         google/ddpm-NAME-256: the LSUN and CelebA-HQ models, 455 MB each
#                         -> data/official/NAME-256_ema.ckpt (`paper256` preset)
# Offline, it says so in one line and exits 0, like `make cifar10 --optional`.
#
# The files' sha256 could not be pinned: the machine this was written on cannot reach
# huggingface.co. The first download prints them; put them into
# data/official-weights.sha256 (sha256sum format, paths relative to data/official/) and
# later downloads are checked against them. The converter checks every tensor's name,
# shape and type regardless, and refuses another model's layout. Where a repository has
# no .safetensors, its diffusion_pytorch_model.bin is fetched instead (the converter
# reads it with python3-torch, without running its pickle's code).
cd "$(dirname "$0")" || exit 1
MODEL=${1:-${MODEL:-cifar10-32}}
case $MODEL in
    cifar10-32) DIR=official; OUT=official/cifar10_ema.ckpt; SIZE="143 MB" ;;
    church-256|bedroom-256|cat-256|celebahq-256) DIR=official/$MODEL; OUT=official/${MODEL}_ema.ckpt; SIZE="455 MB" ;;
    *) echo "make official-weights: MODEL=$MODEL: unknown; pass cifar10-32, church-256, bedroom-256, cat-256 or celebahq-256" >&2; exit 2 ;;
esac
BASE=https://huggingface.co/google/ddpm-$MODEL/resolve/main
[ -f "$OUT" ] && { echo "$OUT exists"; exit 0; }
offline() { rmdir "$DIR" official 2>/dev/null; echo "make official-weights: $1; run it again when online (nothing was changed)"; exit 0; }
fetch() {   # fetch URL FILE [quiet]: 0 downloaded, 22 not there (an HTTP error), else no connection
    if command -v curl >/dev/null 2>&1; then
        if [ -n "$3" ]; then curl -fsL --connect-timeout 15 -o "$2" "$1"; else curl -fL --progress-bar --connect-timeout 15 -o "$2" "$1"; fi
        r=$?; [ $r -eq 22 ] && return 22; return $r
    elif command -v wget >/dev/null 2>&1; then
        if [ -n "$3" ]; then wget -q -T 15 -O "$2" "$1"; else wget -q --show-progress -T 15 -O "$2" "$1"; fi
        r=$?; [ $r -eq 8 ] && return 22; return $r
    fi
    return 127
}
command -v curl >/dev/null 2>&1 || command -v wget >/dev/null 2>&1 || offline "neither curl nor wget is installed"
mkdir -p "$DIR" || exit 1
fetch "$BASE/config.json" "$DIR/config.json.part" quiet; r=$?
if [ $r -eq 22 ]; then
    rm -f "$DIR/config.json.part"; rmdir "$DIR" official 2>/dev/null
    echo "make official-weights: huggingface.co has no google/ddpm-$MODEL (HTTP error); check the name" >&2; exit 1
fi
[ $r -eq 0 ] || { rm -f "$DIR/config.json.part"; offline "no connection to huggingface.co"; }
mv "$DIR/config.json.part" "$DIR/config.json"
WEIGHTS=$DIR/diffusion_pytorch_model.safetensors
if [ ! -f "$WEIGHTS" ] && [ ! -f "$DIR/diffusion_pytorch_model.bin" ]; then
    echo "downloading $BASE/diffusion_pytorch_model.safetensors ($SIZE)"
    fetch "$BASE/diffusion_pytorch_model.safetensors" "$WEIGHTS.part"; r=$?
    if [ $r -eq 22 ]; then
        rm -f "$WEIGHTS.part"
        WEIGHTS=$DIR/diffusion_pytorch_model.bin
        echo "no .safetensors there; downloading $BASE/diffusion_pytorch_model.bin ($SIZE)"
        fetch "$BASE/diffusion_pytorch_model.bin" "$WEIGHTS.part"; r=$?
    fi
    [ $r -eq 0 ] || { rm -f "$WEIGHTS.part"; offline "the download from huggingface.co failed"; }
    mv "$WEIGHTS.part" "$WEIGHTS"
elif [ ! -f "$WEIGHTS" ]; then
    WEIGHTS=$DIR/diffusion_pytorch_model.bin
fi
NAME=${WEIGHTS#official/}
if [ -f official-weights.sha256 ] && grep -q "  $NAME\$" official-weights.sha256; then
    (cd official && grep "  $NAME\$" ../official-weights.sha256 | sha256sum -c --quiet) ||
        { echo "make official-weights: sha256 mismatch against data/official-weights.sha256; delete data/$WEIGHTS and download again" >&2; exit 1; }
else
    echo "sha256 of the download (not pinned yet; see the top of data/get_official_weights.sh):"
    (cd official && sha256sum "$NAME")
fi
[ -x ../ddpm ] || { echo "make official-weights: build ./ddpm first (make)" >&2; exit 1; }
${PYTHON:-python3} convert_official.py "$WEIGHTS" "$OUT" --model "$MODEL" --ddpm ../ddpm || exit 1
