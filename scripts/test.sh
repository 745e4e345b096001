#!/usr/bin/env bash
# The one test command: installs what the tests need (NVRTC and ptxas from PyPI for the CUDA
# compile and spill tests; Rust crates come from cargo), then checks formatting, lints, and runs
# every test.
# Usage: bash scripts/test.sh      (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

# A C++ compiler for the CUDA emulator (crates/cuda-emulator builds the kernels for the host, so
# the CUDA tests run on machines without a GPU): g++ 12 or later (for _Float16), from apt if absent.
cxx="${CXX:-c++}"
cxx_major="$("$cxx" -dumpversion 2>/dev/null | cut -d. -f1 || true)"
if ! [ "${cxx_major:-0}" -ge 12 ] 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=""
    elif command -v sudo >/dev/null 2>&1; then
        as_root="sudo -n"
    else
        echo "scripts/test.sh: needs g++ 12 or later (found '${cxx_major:-none}'); install it (apt-get install g++) or run as root" >&2
        exit 1
    fi
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >&2
    export CXX=g++
fi
# Every CUDA test must run here (on the emulator where there is no GPU), never skip.
export PFC_REQUIRE_CUDA_TESTS=1

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
# The examples the device check runs, smoke-run at small shapes on the CPU emulator (the test
# profile reuses the build above), so a broken one is found here and not in device time.
cargo run --quiet --profile test --features cuda --example cuda_profile_step -- --small --emulator > /dev/null
