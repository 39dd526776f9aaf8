#!/bin/sh
# Unpacks Fashion-MNIST from Debian's dataset-fashion-mnist package (the offline dataset
# of the tests and CI) into data/fashion-mnist/ as plain IDX files.
cd "$(dirname "$0")" || exit 1
SRC=/usr/share/datasets/fashion-mnist
mkdir -p fashion-mnist
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f fashion-mnist/$f ] && continue
    if [ ! -f $SRC/$f.gz ]; then
        echo "make fashion-mnist: $SRC/$f.gz not found; install it with: apt-get install dataset-fashion-mnist" >&2
        exit 1
    fi
    gunzip -c $SRC/$f.gz > fashion-mnist/$f.part && mv fashion-mnist/$f.part fashion-mnist/$f || exit 1
done
