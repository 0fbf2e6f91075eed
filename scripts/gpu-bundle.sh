#!/usr/bin/env bash
# Makes the offline vLLM bundle for the GPU host (../shared/gpu-host/make-bundle.sh) and cuts it
# into parts that fit the device tool's 64 MiB carry limit, which counts the repository and the
# wheel too. The parts are re-cut from the bundle's bytes (bundle.tgz.part00, part01, ... in
# part-1, part-2, ...); install-bundle.sh concatenates bundle.tgz.part* in name order, so the
# bytes arrive unchanged (checked below against the original stream).
#
#   bash scripts/gpu-bundle.sh [.gpu-bundle]
#   then `bench/gpu_e2e.sh stage N` for every part but the last, and `start` with the last.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gpu-bundle}
limit=$((64 * 1024 * 1024))

if ! ls "$out"/part-*/bundle.tgz.part* > /dev/null 2>&1; then
  bash ../shared/gpu-host/make-bundle.sh "$out"
fi

bytes_of() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }
# What every call carries anyway: tracked files and untracked files git does not ignore, counted
# in 4 KiB blocks. The tool's accounting is not ours to the byte: session 19's 52 MiB part-2
# was refused with an 11 MiB repository (1,568 files), so count generously.
tree=$(git ls-files -z --cached --others --exclude-standard \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s += int(($1 + 4095) / 4096) * 4096} END {print s}')
wheel=$(bytes_of .gpu-wheel)
margin=$((3 * 1024 * 1024))  # COMMIT, install-bundle.sh, the tool's own overhead
room=$((limit - tree - wheel - margin))
[ "$room" -gt $((8 * 1024 * 1024)) ] || { echo "no room left for bundle parts" >&2; exit 1; }

# One stream of the bundle's bytes in install order, then re-cut.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2046  # names without spaces, sorted as install-bundle.sh sorts them
cat $(for f in "$out"/part-*/bundle.tgz.part*; do echo "$(basename "$f") $f"; done \
  | sort | cut -d' ' -f2) > "$tmp/bundle.tgz"
cp "$out/part-1/install-bundle.sh" "$tmp/"
rm -rf "$out"/part-*
split -b "$room" -d -a 2 "$tmp/bundle.tgz" "$tmp/bundle.tgz.part"
n=0
for f in "$tmp"/bundle.tgz.part??; do
  n=$((n + 1))
  mkdir -p "$out/part-$n"
  mv "$f" "$out/part-$n/"
  cp "$tmp/install-bundle.sh" "$out/part-$n/"
done
cat "$out"/part-*/bundle.tgz.part* | cmp -s - "$tmp/bundle.tgz" \
  || { echo "re-cut check failed" >&2; exit 1; }
for i in $(seq 1 "$n"); do
  echo "part-$i: $(( ($(bytes_of "$out/part-$i") + tree + wheel + margin) / 1024 / 1024 )) MiB with the repository and the wheel"
done
echo "$n parts: stage 1 .. stage $((n - 1)), then start with part-$n"
