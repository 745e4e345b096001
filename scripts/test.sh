#!/usr/bin/env bash
# The one test command: installs what the tests need (NVRTC and ptxas from PyPI for the CUDA
# compile and spill tests; Rust crates come from cargo), then checks formatting, lints, and runs
# every test.
# Usage: bash scripts/test.sh      (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

# A C++ compiler for the CUDA emulator (crates/cuda-emulator builds the kernels for the host, so
# the CUDA tests run on machines without a GPU).
if ! command -v c++ >/dev/null 2>&1; then
    sudo_if_needed=""
    [ "$(id -u)" -ne 0 ] && sudo_if_needed="sudo"
    $sudo_if_needed apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo_if_needed apt-get install -y -qq g++ >&2
fi

# NVRTC and the CUDA headers, so every kernel is compiled for every architecture even without a GPU,
# and ptxas, so every kernel's registers and spills are checked (tests/cuda_ptxas.rs).
nvrtc_env="$(bash scripts/install-nvrtc.sh)"
PFC_NVRTC_LIB="$(echo "$nvrtc_env" | sed -n 's/^PFC_NVRTC_LIB=//p')"
PFC_NVRTC_INCLUDE="$(echo "$nvrtc_env" | sed -n 's/^PFC_NVRTC_INCLUDE=//p')"
PFC_PTXAS="$(echo "$nvrtc_env" | sed -n 's/^PFC_PTXAS=//p')"
export PFC_NVRTC_INCLUDE PFC_PTXAS
export LD_LIBRARY_PATH="$PFC_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cargo fmt --all --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --quiet
cargo test --workspace --all-features
