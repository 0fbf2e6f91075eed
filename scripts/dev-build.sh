#!/usr/bin/env bash
# Builds the extension in place (no install): python/gptoss_3090/_native.abi3.so.
# Then `PYTHONPATH=python pytest` runs against this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
if [ "$profile" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
cp "${CARGO_TARGET_DIR:-target}/$profile/lib_native.so" python/gptoss_3090/_native.abi3.so
