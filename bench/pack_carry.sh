#!/usr/bin/env bash
# Packs what a GPU call must carry into .carry/ (git-ignored), small enough for the device's 64 MiB working-tree
# limit next to the shipped checkpoints: diffusers + torch-pruning (+ importlib_metadata) unpacked from wheels and
# re-packed as one tar.xz (6.4 MB of wheels -> ~1.9 MB), and the Fashion-MNIST training split with the images
# re-compressed as .xz (26.4 -> 22.6 MB; the loader reads .gz, .xz or raw IDX). The test split is left out: the
# GPU jobs use the shipped FD reference statistics, not the test images. Then call the device with
# carry=[".carry"]; bench/gpu_env.sh unpacks the site packages into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${DATA:-/usr/share/datasets/fashion-mnist}
[ -d "$src" ] || src=.data/fashion-mnist
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/whl"
if ls .whl/*.whl >/dev/null 2>&1; then cp .whl/*.whl "$tmp/whl/"    # wheels fetched earlier (bench/README.md)
else python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$tmp/whl" diffusers==0.42.1 torch-pruning==1.6.0 importlib_metadata; fi
mkdir -p "$tmp/site" .carry/fashion-mnist
for w in "$tmp"/whl/*.whl; do (cd "$tmp/site" && python3 -m zipfile -e "$w" .); done
find "$tmp/site" -name '*.pyc' -delete
tar -C "$tmp/site" -cf - . | xz -9 -T2 > .carry/site.tar.xz
gzip -dc "$src/train-images-idx3-ubyte.gz" | xz -9e -T2 > .carry/fashion-mnist/train-images-idx3-ubyte.xz
cp "$src/train-labels-idx1-ubyte.gz" .carry/fashion-mnist/
du -sh .carry/*
