#!/usr/bin/env bash
# GPU verification in two halves.
#
#   bash scripts/device-check.sh build   (here, with Rust) -> device-carry/ (test + bench binaries, golden files)
#   bash scripts/device-check.sh run     (on the GPU machine, repo root, $OUT set; no Rust needed)
#
# `run` prints the device, driver and CUDA versions, runs every GPU test binary, compute-sanitizer
# memcheck and racecheck over the kernel tests (filtered to stay short), and the CUDA benches with
# short criterion settings, the peak GPU memory of our step (examples/cuda_step_memory) and the
# PyTorch PartialFC_V2 baseline (benches/torch_partial_fc.py), then the targets table of
# scripts/device-summary.py; everything is teed into $OUT/device-log.txt. Expected: 3-5 minutes.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
carry="$root/device-carry"
mode="${1:-}"

build() {
    set -e
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target}"
    rm -rf "$carry" && mkdir -p "$carry/bin" "$carry/golden"
    cd "$root"
    local json
    json="$(mktemp)"
    cargo test --release --features cuda --no-run --message-format=json --test cuda_kernels --test cuda_compile --test cuda_nccl --test cuda_memory --test cuda_step_fuzz --test cuda_checkpoint > "$json"
    cargo bench --features cuda --no-run --message-format=json --bench cuda_kernels --bench cuda_collectives >> "$json"
    cargo build --release --features cuda --message-format=json --example cuda_step_memory \
        --example cuda_profile_step --example multi_gpu --example train_synthetic >> "$json"
    python3 - "$json" "$carry/bin" <<'PY'
import json, shutil, sys
seen = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        kind = "bench" if "bench" in t["kind"] else "example" if "example" in t["kind"] else "test"
        if t["name"].startswith("cuda_") or t["name"] in ("multi_gpu", "train_synthetic"):
            seen[f"{kind}-{t['name']}"] = m["executable"]
for name, exe in seen.items():
    shutil.copy(exe, f"{sys.argv[2]}/{name}")
    print(name, "<-", exe)
PY
    rm -f "$json"
    strip "$carry"/bin/* || true
    cp "$root/benches/torch_partial_fc.py" "$carry/"
    cp "$root"/../shared/golden/*.safetensors "$carry/golden/" 2>/dev/null || echo "warning: no ../shared/golden"
    du -sh "$carry"
    ls -la "$carry/bin"
}

run() {
    out="${OUT:-$root/device-out}"
    mkdir -p "$out"
    log="$out/device-log.txt"
    exec > >(tee "$log") 2>&1
    echo "== device check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    orig_ld="${LD_LIBRARY_PATH:-}"  # torch runs with its own libraries, not ours
    libs="/usr/local/cuda/lib64"
    for d in $(python3 -c 'import site,glob,os; print(" ".join(sorted({os.path.dirname(p) for s in site.getsitepackages()+[site.getusersitepackages()] for p in glob.glob(s+"/nvidia/*/lib/*.so*")})))' 2>/dev/null); do
        libs="$libs:$d"
    done
    export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
    for d in ${libs//:/ }; do
        if [ -e "$d/libnccl.so.2" ] && [ ! -e "$d/libnccl.so" ]; then
            mkdir -p "$out/.libs" && ln -sf "$d/libnccl.so.2" "$out/.libs/libnccl.so"
            export LD_LIBRARY_PATH="$out/.libs:$LD_LIBRARY_PATH"
        fi
    done
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi || true
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || true
    (nvcc --version || ls /usr/local/cuda/lib64/libnvrtc.so*) 2>&1 | tail -3
    export PFC_GOLDEN_DIR="$carry/golden"
    bin="$carry/bin"
    status=0
    echo "== tests"
    for t in "$bin"/test-*; do
        echo "-- $t"
        timeout 240 "$t" --nocapture --test-threads=1 || status=1
    done
    san="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
    filter="margin_softmax_passes_match_cpu margin_softmax_fused_matches_cpu padded_logits_rows normalize_gather optimizer_and_scatter localize_labels gemms class_max class_top_k margin_softmax16 wire_casts"
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool"
        timeout 150 "$san" --tool "$tool" --error-exitcode 9 "$bin/test-cuda_kernels" --test-threads=1 $filter || { echo "SANITIZER $tool FAILED ($?)"; status=1; }
    done
    echo "== compute-sanitizer --tool memcheck (sampling)"
    timeout 150 "$san" --tool memcheck --error-exitcode 9 "$bin/test-cuda_kernels" --test-threads=1 sampled_index sampler_candidate || { echo "SANITIZER memcheck sampling FAILED ($?)"; status=1; }
    echo "== compute-sanitizer --tool racecheck (sampler, small shards)"
    timeout 120 "$san" --tool racecheck --error-exitcode 9 "$bin/test-cuda_kernels" --test-threads=1 sampler_candidate || { echo "SANITIZER racecheck sampling FAILED ($?)"; status=1; }
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool (wire kernels)"
        timeout 120 "$san" --tool "$tool" --error-exitcode 9 "$bin/test-cuda_nccl" --test-threads=1 wire_kernels || { echo "SANITIZER $tool wire FAILED ($?)"; status=1; }
    done
    echo "== benches"
    for b in "$bin"/bench-*; do
        timeout 200 "$b" --bench --warm-up-time 1 --measurement-time 2 --sample-size 10 || status=1
    done
    echo "== peak GPU memory of our step"
    for opts in "--precision f32 --momentum-dtype f32" "--precision bf16 --momentum-dtype f32" \
                "--precision bf16 --momentum-dtype bf16"; do
        timeout 120 "$bin/example-cuda_step_memory" $opts || status=1
    done
    echo "== per-kernel profile of one step"
    timeout 120 "$bin/example-cuda_profile_step" || status=1
    echo "== multi_gpu example: launcher, TCP rendezvous, NCCL (one process per GPU)"
    ngpu="$(nvidia-smi -L 2>/dev/null | wc -l)"
    MASTER_PORT=29517 timeout 120 "$bin/example-multi_gpu" --launch "${ngpu:-1}" --steps 3 --classes 200000 || status=1
    echo "== multi_gpu example with every 16-bit option (GEMMs and logits, momentum, both wires)"
    MASTER_PORT=29518 timeout 120 "$bin/example-multi_gpu" --launch "${ngpu:-1}" --steps 3 --classes 200000 \
        --precision bf16 --momentum-dtype bf16 --wire-dtype bf16 --grad-wire-dtype bf16 || status=1
    echo "== training demo with the classifier on the GPU (4 virtual ranks)"
    timeout 150 "$bin/example-train_synthetic" --backend cuda --steps 400 || status=1
    echo "== PyTorch baseline (benches/torch_partial_fc.py)"
    py=python3
    LD_LIBRARY_PATH="$orig_ld" python3 -c 'import torch' 2>/dev/null || py=/opt/torch/.venv/bin/python
    LD_LIBRARY_PATH="$orig_ld" "$py" -c 'import torch; print("torch", torch.__version__, "at", torch.__file__)' || echo "no torch found"
    LD_LIBRARY_PATH="$orig_ld" timeout 240 "$py" "$carry/torch_partial_fc.py" || { echo "TORCH BASELINE FAILED ($?)"; status=1; }
    echo "== targets, each against its baseline in this run (scripts/device-summary.py)"
    sleep 1  # let tee write the lines above to the log first
    python3 "$root/scripts/device-summary.py" "$log" || echo "summary failed ($?)"
    echo "== done, status $status"
    return $status
}

case "$mode" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
