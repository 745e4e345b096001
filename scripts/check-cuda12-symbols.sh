#!/usr/bin/env bash
# Checks, without a GPU, that CUDA 12.x libraries export every function the crate (and cudarc on
# its behalf) calls: the CUDA backend is built against cudarc's CUDA 13 bindings and loads the
# libraries at run time, so a function missing from an older library would only show as a panic
# on the user's machine.
#
# The list of functions called is what the CPU emulator exports (crates/cuda-emulator/cpp/*.cpp,
# lines starting with `API`): the emulator's tests fail on any call it lacks. It is compared with
# the dynamic symbols of:
#   - libcuda.so.1 of NVIDIA driver 535 (CUDA 12.2), from Debian bookworm's non-free `libcuda1`
#     (downloaded with `apt-get download`; a temporary apt source, removed afterwards);
#   - libcublas.so.12 from NVIDIA's PyPI wheel (~580 MB; PFC_SKIP_CUBLAS=1 skips it);
#   - libnccl.so.2 from nvidia-nccl-cu12 (PFC_NCCL_VERSION, default 2.21.5, a 2024 release;
#     ~200 MB).
# NVRTC is not in the list (the emulator uses the real one): CI compiles every kernel with NVRTC
# 12.9 on every run. Functions of the emulator's own (emu_*) are not CUDA's and are left out. Prints each library's
# missing functions; exits 1 if a function the crate calls is missing.
#
# Needs root for apt (run it in a throwaway container or VM), python3 with pip, and binutils (nm).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=${PFC_CUDA12_WORK:-/tmp/pfc-cuda12-symbols}
mkdir -p "$work"
cd "$work"

called=$(grep -h '^API' "$root"/crates/cuda-emulator/cpp/*.cpp |
    sed -E 's/^API +[A-Za-z_0-9]+( +const)?[ *]+([A-Za-z_0-9]+)\(.*/\2/; s/^API +const +char\* +([A-Za-z_0-9]+)\(.*/\1/' |
    grep -v '^emu_' | sort -u)

if [ ! -e libcuda1.deb ]; then
    source_file=/etc/apt/sources.list.d/pfc-nonfree-tmp.sources
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$source_file"
    trap 'rm -f "$source_file"; apt-get update -qq || true' EXIT
    apt-get update -qq
    apt-get download libcuda1 2>/dev/null
    mv libcuda1_*.deb libcuda1.deb
fi
rm -rf driver && dpkg-deb -x libcuda1.deb driver
libcuda=$(find driver -name 'libcuda.so.1' | head -1)

wheel() { # package==version, then the library's file name inside it
    local spec=$1 lib=$2 dir
    dir=wheels/${spec%%==*}
    if [ ! -e "$dir/done" ]; then
        rm -rf "$dir" && mkdir -p "$dir"
        python3 -m pip download --quiet --no-deps -d "$dir" "$spec"
        python3 -m zipfile -e "$dir"/*.whl "$dir/x"
        touch "$dir/done"
    fi
    find "$dir/x" -name "$lib" | head -1
}
libnccl=$(wheel "nvidia-nccl-cu12==${PFC_NCCL_VERSION:-2.21.5}" libnccl.so.2)
libcublas=""
if [ "${PFC_SKIP_CUBLAS:-0}" != 1 ]; then
    libcublas=$(wheel nvidia-cublas-cu12==12.9.1.4 libcublas.so.12)
fi

exports() { nm -D --defined-only "$1" | awk '{print $3}' | sed 's/@.*//' | sort -u; }

status=0
check() { # label, prefix regex, library
    local label=$1 prefix=$2 lib=$3 missing
    if [ -z "$lib" ]; then
        echo "$label: skipped"
        return
    fi
    missing=$(comm -23 <(grep -E "^$prefix" <<<"$called") <(exports "$lib"))
    local n
    n=$(grep -cE "^$prefix" <<<"$called" || true)
    if [ -z "$missing" ]; then
        echo "$label ($lib): all $n functions present"
    else
        echo "$label ($lib): $n functions, missing:" $missing
        status=1
    fi
}
check "driver 535 (CUDA 12.2)" 'cu[A-Z]' "$libcuda"
check "cuBLAS 12.9" 'cublas' "$libcublas"
check "NCCL ${PFC_NCCL_VERSION:-2.21.5} (cu12)" 'nccl' "$libnccl"
exit $status
