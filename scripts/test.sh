#!/usr/bin/env bash
# The one test command: installs what the tests need (NVRTC from PyPI for the CUDA compile test;
# Rust crates come from cargo), then checks formatting, lints, and runs every test.
# Usage: bash scripts/test.sh      (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

# NVRTC and the CUDA headers, so every kernel is compiled for every architecture even without a GPU.
if [ -f scripts/install-nvrtc.sh ]; then
    eval "$(bash scripts/install-nvrtc.sh --print-env)"
fi

cargo fmt --check
cargo clippy --all-targets --all-features -- -D warnings
cargo test --all-features
