#!/usr/bin/env bash
# The one test command: installs what the tests need (NVRTC and ptxas from PyPI for the CUDA
# compile and spill tests; Rust crates come from cargo), then checks formatting, lints, and runs
# every test.
# Usage: bash scripts/test.sh      (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need, from apt when absent (as root, or through passwordless sudo).
apt_install() {
    local as_root=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            as_root="sudo -n"
        else
            echo "scripts/test.sh: needs $*; install it (apt-get install $*) or run as root" >&2
            exit 1
        fi
    fi
    if [ -z "${apt_updated:-}" ]; then
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        apt_updated=1
    fi
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# A C++ compiler for the CUDA emulator (crates/cuda-emulator builds the kernels for the host, so
# the CUDA tests run on machines without a GPU): g++ 12 or later (for _Float16). The first that
# is new enough of $CXX, c++, g++ and g++-14..12; else from apt (g++, then g++-12).
cxx_major() { "$1" -dumpversion 2>/dev/null | cut -d. -f1 || true; }
pick_cxx() {
    local c
    for c in ${CXX:-} c++ g++ g++-14 g++-13 g++-12; do
        if [ "$(cxx_major "$c")" -ge 12 ] 2>/dev/null; then
            echo "$c"
            return 0
        fi
    done
    return 1
}
if ! cxx="$(pick_cxx)"; then
    apt_install g++
    cxx="$(pick_cxx)" || { apt_install g++-12 || true; cxx="$(pick_cxx)"; } || {
        echo "scripts/test.sh: the CUDA emulator needs g++ 12 or later; apt gave g++ $(cxx_major g++)" >&2
        exit 1
    }
fi
export CXX="$cxx"
# python3 with pip: NVRTC and ptxas come from PyPI (scripts/install-nvrtc.sh), and
# tests/device_summary.rs runs scripts/device-summary.py.
command -v python3 >/dev/null 2>&1 || apt_install python3
python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
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
# Once more, the CUDA tests with the emulator's kernels and GEMMs built with fused multiply-adds
# (PFC_EMULATOR_FMA=1: only the emulator and these tests rebuild). A GPU fuses a·b + c where the
# CPU rounds twice; a test whose bound holds only without that fails here, not in device time.
if grep -qw fma /proc/cpuinfo 2>/dev/null; then
    PFC_EMULATOR_FMA=1 cargo test --all-features --test 'cuda_*' --test top_k_merge_emulated \
        --test layer16_emulated
else
    echo "scripts/test.sh: skipped the CUDA tests with fused multiply-adds: this CPU has no FMA" >&2
fi
