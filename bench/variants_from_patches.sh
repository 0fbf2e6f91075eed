#!/bin/bash
# Kernel variant folders for `bench/gpu_kernels.sh moevariants nf4variants` from patch files:
# .gpu-variants/a_head gets HEAD's kernels, and each kernel-only patch its own folder (named
# after the patch file without `next_` and `.patch`) with HEAD's kernels plus that patch. A
# patch that also changes Rust or Python code needs its own wheel instead (`moebase`); it is
# listed and skipped here.
#
#   bash bench/variants_from_patches.sh bench/results/<session>/next_peel.patch ...
set -eu
root=$(git rev-parse --show-toplevel)
cd "$root"
out=.gpu-variants
rm -rf "$out"
mkdir -p "$out/a_head"
cp kernels/common.cuh kernels/*.cu "$out/a_head/"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for patch in "$@"; do
  name=$(basename "$patch" .patch)
  name=${name#next_}
  if git apply --numstat "$patch" | awk '{print $3}' | grep -qv '^kernels/'; then
    echo "skip $name: it changes more than kernels/ (build a wheel with it, bench moebase)"
    continue
  fi
  rm -rf "$work/k" && mkdir -p "$work/k/kernels"
  cp kernels/common.cuh kernels/*.cu "$work/k/kernels/"
  (cd "$work/k" && git init -q && git apply "$root/$patch")
  mkdir -p "$out/$name"
  cp "$work/k/kernels/"* "$out/$name/"
  echo "variant $name"
done
du -sh "$out"
