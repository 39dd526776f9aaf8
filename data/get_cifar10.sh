#!/bin/sh
# Downloads CIFAR-10 (binary version) from its official site, checks the md5 published
# there, and unpacks data/cifar-10-batches-bin/. With --optional (what plain `make`
# uses) a failed download prints one line and exits 0, so an offline build succeeds.
cd "$(dirname "$0")" || exit 1
URL=https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz
optional=no
[ "$1" = "--optional" ] && optional=yes
if [ -f cifar-10-batches-bin/data_batch_5.bin ] && [ -f cifar-10-batches-bin/test_batch.bin ]; then
    exit 0
fi
fail() {
    if [ $optional = yes ]; then
        echo "make: CIFAR-10 not downloaded ($1); run 'make cifar10' when online, or train offline with './ddpm --data fashion-mnist'"
        exit 0
    fi
    echo "make cifar10: $1" >&2
    exit 1
}
if [ ! -f cifar-10-binary.tar.gz ]; then
    echo "downloading $URL (162 MiB)"
    if command -v curl >/dev/null 2>&1; then
        curl -fL --connect-timeout 15 -o cifar-10-binary.tar.gz.part "$URL" || { rm -f cifar-10-binary.tar.gz.part; fail "no connection to www.cs.toronto.edu"; }
    elif command -v wget >/dev/null 2>&1; then
        wget -q -T 15 -O cifar-10-binary.tar.gz.part "$URL" || { rm -f cifar-10-binary.tar.gz.part; fail "no connection to www.cs.toronto.edu"; }
    else
        fail "neither curl nor wget is installed"
    fi
    mv cifar-10-binary.tar.gz.part cifar-10-binary.tar.gz
fi
md5sum -c --quiet cifar-10-binary.md5 || { mv cifar-10-binary.tar.gz cifar-10-binary.tar.gz.bad; fail "md5 mismatch: the download is corrupt (kept as data/cifar-10-binary.tar.gz.bad)"; }
tar xzf cifar-10-binary.tar.gz || fail "could not unpack data/cifar-10-binary.tar.gz"
echo "CIFAR-10 ready in data/cifar-10-batches-bin/"
