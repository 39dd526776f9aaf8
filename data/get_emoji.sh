#!/bin/sh
# Twemoji as a folder of pictures (`make emoji`): the 3,786 64x64 RGBA PNGs of npm's
# emoji-datasource-twitter, fetched with `npm pack` at a pinned version and checked
# against its SHA-256. Every 20th picture, in sorted order, is held out:
#   data/emoji/        3,597 pictures, to train on   (./ddpm --data data/emoji --img 32)
#   data/emoji-test/     189 pictures, held out      (./ddpm bpd --data data/emoji-test ...)
# The graphics are Twemoji by Twitter, Inc and other contributors, licensed CC-BY 4.0
# (https://creativecommons.org/licenses/by/4.0/); the package's own code is MIT.
cd "$(dirname "$0")" || exit 1
VERSION=16.0.0
TGZ=emoji-datasource-twitter-$VERSION.tgz
SHA256=f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877
if [ -f emoji/.complete ] && [ -f emoji-test/.complete ]; then exit 0; fi
if [ ! -f $TGZ ]; then
    command -v npm >/dev/null || { echo "make emoji: npm not found; apt-get install npm" >&2; exit 1; }
    echo "fetching $TGZ with npm pack"
    rm -rf .npm-pack && mkdir .npm-pack &&
        (cd .npm-pack && npm pack --silent emoji-datasource-twitter@$VERSION >/dev/null) &&
        mv .npm-pack/$TGZ $TGZ.part && rm -rf .npm-pack ||
        { rm -rf .npm-pack; echo "make emoji: npm pack emoji-datasource-twitter@$VERSION failed (is the npm registry reachable?)" >&2; exit 1; }
    echo "$SHA256  $TGZ.part" | sha256sum -c --quiet - || { rm -f $TGZ.part; echo "make emoji: $TGZ does not match its checksum" >&2; exit 1; }
    mv $TGZ.part $TGZ
fi
echo "$SHA256  $TGZ" | sha256sum -c --quiet - || { echo "make emoji: data/$TGZ does not match its checksum; delete it and run make emoji again" >&2; exit 1; }
rm -rf emoji emoji-test .emoji-unpack && mkdir -p .emoji-unpack emoji emoji-test || exit 1
tar xzf $TGZ -C .emoji-unpack package/img/twitter/64 package/LICENSE || exit 1
i=0
for f in $(ls .emoji-unpack/package/img/twitter/64 | LC_ALL=C sort); do
    if [ $((i % 20)) -eq 19 ]; then mv .emoji-unpack/package/img/twitter/64/$f emoji-test/; else mv .emoji-unpack/package/img/twitter/64/$f emoji/; fi
    i=$((i + 1))
done
for d in emoji emoji-test; do cp .emoji-unpack/package/LICENSE $d/LICENSE-package.txt && echo "Twemoji graphics (c) Twitter, Inc and other contributors, CC-BY 4.0: https://creativecommons.org/licenses/by/4.0/ (from npm emoji-datasource-twitter@$VERSION)" > $d/ATTRIBUTION.txt; done
rm -rf .emoji-unpack
n=$(ls emoji | grep -c '\.png$'); m=$(ls emoji-test | grep -c '\.png$')
[ "$n" -eq 3597 ] && [ "$m" -eq 189 ] || { echo "make emoji: expected 3597 + 189 pictures, unpacked $n + $m" >&2; exit 1; }
touch emoji/.complete emoji-test/.complete
echo "data/emoji: $n pictures to train on; data/emoji-test: $m held out (Twemoji, CC-BY 4.0)"
