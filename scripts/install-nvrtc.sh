#!/usr/bin/env bash
# Installs NVRTC (and the CUDA runtime headers cuda_fp16.h / cuda_bf16.h) from NVIDIA's Python
# wheels into a cache folder, so the kernel-compile test runs on machines without a CUDA toolkit.
# Also installs ptxas (from the nvcc wheel, same 12.9 release as NVRTC), which the spill test
# (tests/cuda_ptxas.rs) runs on the PTX of every kernel to read its registers and spills.
#
#   bash scripts/install-nvrtc.sh [CACHE_DIR]      (default: .nvrtc/ in the repository root)
#
# Idempotent: a second run with the packages present does nothing. Prints three lines:
#   PFC_NVRTC_LIB=<dir holding libnvrtc.so.12>
#   PFC_NVRTC_INCLUDE=<dir holding cuda_fp16.h>
#   PFC_PTXAS=<path of the ptxas executable>
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${1:-$root/.nvrtc}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
lib="$cache/nvidia/cuda_nvrtc/lib"
inc="$cache/nvidia/cuda_runtime/include"
ptxas="$cache/nvidia/cuda_nvcc/bin/ptxas"
if ! ls "$lib"/libnvrtc.so.12* >/dev/null 2>&1 || [ ! -f "$inc/cuda_fp16.h" ] || [ ! -f "$ptxas" ]; then
    # All three in one install, with --upgrade: pip --target skips a top-level folder (nvidia/)
    # that already exists, so adding a wheel to an older cache would silently install nothing;
    # --upgrade replaces the folder with one holding all three.
    pip="python3 -m pip"
    $pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$cache" \
        "nvidia-cuda-nvrtc-cu12==12.9.86" "nvidia-cuda-runtime-cu12==12.9.79" \
        "nvidia-cuda-nvcc-cu12==12.9.86" >&2
fi
[ -x "$ptxas" ] || chmod +x "$ptxas"
# cudarc looks for libnvrtc.so first: give it that name too.
if [ ! -e "$lib/libnvrtc.so" ]; then
    so="$(ls "$lib"/libnvrtc.so.12* | head -n1)"
    ln -sf "$(basename "$so")" "$lib/libnvrtc.so"
fi
echo "PFC_NVRTC_LIB=$lib"
echo "PFC_NVRTC_INCLUDE=$inc"
echo "PFC_PTXAS=$ptxas"
