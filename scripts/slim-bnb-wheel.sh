#!/usr/bin/env bash
# A bitsandbytes wheel for the GPU host (no network there, 64 MiB per call): the PyPI wheel
# without the native libraries of other CUDA versions and of ROCm/XPU, so the GPU tests can
# compare our quantizer with bitsandbytes' CUDA one and the linear benchmark can time its 4-bit
# kernels. Keeps libbitsandbytes_cuda${CUDA_TAG:-130} and the CPU library (about 4 MB in all).
#
#   bash scripts/slim-bnb-wheel.sh [.gpu-bnb]      # then carry .gpu-bnb (gitignored)
set -euo pipefail
out=${1:-.gpu-bnb}
tag=${CUDA_TAG:-130}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
  -d "$work" "bitsandbytes${BNB_VERSION:+==$BNB_VERSION}"
mkdir -p "$out"
rm -f "$out"/bitsandbytes-*.whl
python3 - "$work" "$out" "$tag" <<'PY'
import base64, glob, hashlib, os, re, sys, zipfile
work, out, tag = sys.argv[1:]
src = glob.glob(os.path.join(work, "bitsandbytes-*.whl"))[0]
keep_lib = re.compile(rf"libbitsandbytes_(cpu|cuda{tag})\.so$")
dst = os.path.join(out, os.path.basename(src))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    rows = []
    for info in zin.infolist():
        name = info.filename
        if name == record_name:
            continue
        if name.endswith(".so") and not keep_lib.search(name):
            continue
        data = zin.read(name)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{name},sha256={digest},{len(data)}")
    rows.append(f"{record_name},,")
    zout.writestr(record_name, "\n".join(rows) + "\n")
print(f"{dst}: {os.path.getsize(dst) / 2**20:.1f} MiB")
PY
