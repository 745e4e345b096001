#!/usr/bin/env bash
# Installs NVRTC (and the CUDA runtime headers cuda_fp16.h / cuda_bf16.h) from NVIDIA's Python
# wheels into a cache folder, so the kernel-compile test runs on machines without a CUDA toolkit.
#
#   bash scripts/install-nvrtc.sh [CACHE_DIR]      (default: .nvrtc/ in the repository root)
#
# Idempotent: a second run with the packages present does nothing. Prints two lines:
#   PFC_NVRTC_LIB=<dir holding libnvrtc.so.12>
#   PFC_NVRTC_INCLUDE=<dir holding cuda_fp16.h>
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${1:-$root/.nvrtc}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
lib="$cache/nvidia/cuda_nvrtc/lib"
inc="$cache/nvidia/cuda_runtime/include"
if ! ls "$lib"/libnvrtc.so.12* >/dev/null 2>&1 || [ ! -f "$inc/cuda_fp16.h" ]; then
    pip="python3 -m pip"
    $pip install --quiet --disable-pip-version-check --no-deps --target "$cache" \
        "nvidia-cuda-nvrtc-cu12==12.9.86" "nvidia-cuda-runtime-cu12==12.9.79" >&2
fi
# cudarc looks for libnvrtc.so first: give it that name too.
if [ ! -e "$lib/libnvrtc.so" ]; then
    so="$(ls "$lib"/libnvrtc.so.12* | head -n1)"
    ln -sf "$(basename "$so")" "$lib/libnvrtc.so"
fi
echo "PFC_NVRTC_LIB=$lib"
echo "PFC_NVRTC_INCLUDE=$inc"
