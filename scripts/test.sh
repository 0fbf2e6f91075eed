#!/usr/bin/env bash
# The project's test command (README "Running the tests"): lint, Rust unit tests, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --quiet
ruff check python tests bench
python3 -m pytest -q
