#!/usr/bin/env bash
# Installs the Debian package dataset-fashion-mnist when its files are missing (idempotent, quiet).
# Root: apt-get install. Not root: apt-get download + dpkg-deb -x into ./data/fashion-mnist.
set -u
DEST=/usr/share/datasets/fashion-mnist
LOCAL="$(pwd)/data/debian"
have() { [ -f "$1/train-images-idx3-ubyte.gz" ] && [ -f "$1/t10k-labels-idx1-ubyte.gz" ]; }
if have "$DEST" || have "$LOCAL/usr/share/datasets/fashion-mnist"; then exit 0; fi
echo "installing Debian package dataset-fashion-mnist (Fashion-MNIST, 31 MB)"
if [ "$(id -u)" = "0" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip" >&2
else
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null && mkdir -p "$LOCAL" && dpkg-deb -x ./*.deb "$LOCAL") \
    || echo "warning: could not fetch dataset-fashion-mnist; set SCT_FMNIST_ROOT or data.root" >&2
  rm -rf "$tmp"
fi
exit 0
