#!/usr/bin/env bash
# Makes the offline vLLM bundle for the GPU host (../shared/gpu-host/make-bundle.sh) and fits its
# parts to the device tool's 64 MiB carry limit, which counts the repository and the wheel too:
# when part-1 (carried with the wheel by `bench/gpu_e2e.sh stage 1`) or part-2 would not fit,
# the tail of its file moves to part-3 (bundle.tgz.part0b, part1b). install-bundle.sh
# concatenates bundle.tgz.part* in name order (part0a, part0b, part1a, part1b, part2), so the
# bytes arrive unchanged.
#
#   bash scripts/gpu-bundle.sh [.gpu-bundle]      # then carry part-1, part-2, part-3 in turn
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gpu-bundle}
limit=$((64 * 1024 * 1024))
margin=$((512 * 1024))  # COMMIT, install-bundle.sh, rounding

if [ ! -e "$out/part-1/bundle.tgz.part0" ] && [ ! -e "$out/part-1/bundle.tgz.part0a" ]; then
  bash ../shared/gpu-host/make-bundle.sh "$out"
fi

bytes_of() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }
# What every call carries anyway: tracked files and untracked files git does not ignore.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
wheel=$(bytes_of .gpu-wheel)
# Split 2 MiB below the limit: the tool's own accounting of folders is not ours to the byte (the
# 62 MiB part-1 of session 12 went through).
headroom=$((margin + 2 * 1024 * 1024))

# part-1 (bundle.tgz.part0, carried with the wheel) and part-2 (bundle.tgz.part1, alone): a part
# that would not fit keeps its head as partNa and hands its tail to part-3 as partNb.
for n in 1 2; do
  f="$out/part-$n/bundle.tgz.part$((n - 1))"
  [ -e "$f" ] || continue
  room=$((limit - tree - headroom))
  [ "$n" != 1 ] || room=$((room - wheel))
  [ "$(bytes_of "$f")" -gt "$room" ] || continue
  head -c "$room" "$f" > "${f}a"
  tail -c +$((room + 1)) "$f" > "$out/part-3/$(basename "$f")b"
  cat "${f}a" "$out/part-3/$(basename "$f")b" | cmp -s - "$f" \
    || { echo "split check failed for $f" >&2; exit 1; }
  rm "$f"
  echo "moved $(bytes_of "$out/part-3/$(basename "$f")b") bytes of part-$n into part-3"
done

for n in 1 2 3; do
  # stage 1 and start carry the wheel with their part; stage 2 carries its part alone.
  with_wheel=$wheel
  [ "$n" != 2 ] || with_wheel=0
  total=$((tree + $(bytes_of "$out/part-$n") + with_wheel + margin))
  state=ok
  [ "$total" -le "$limit" ] || state="OVER the 64 MiB limit"
  echo "part-$n: $((total / 1024 / 1024)) MiB with what its call carries besides: $state"
done
