#!/usr/bin/env bash
# GPU verification in two halves.
#
#   bash scripts/device-check.sh build   (here, with Rust) -> device-carry/ (test + bench binaries, golden files)
#   bash scripts/device-check.sh run     (on the GPU machine, repo root, $OUT set; no Rust needed)
#
# device-carry/ is ignored by git: name it in the device tool's `carry` or it does not travel.
# `run` keeps to a budget (PFC_DEVICE_BUDGET_S, default 480 s): each step's timeout is cut to the
# time left, and a step with under 20 s left is skipped with a line that says so. The order puts
# what only a GPU can tell first: the tests, then the targets' measurements, then the sanitizers.
#
# `run` prints the device, driver and CUDA versions, runs every GPU test binary, compute-sanitizer
# memcheck and racecheck over the kernel tests (filtered to stay short), and the CUDA benches with
# short criterion settings, the peak GPU memory of our step (examples/cuda_step_memory) and the
# PyTorch PartialFC_V2 baseline (benches/torch_partial_fc.py), then the targets table of
# scripts/device-summary.py; everything is teed into $OUT/device-log.txt. Expected: 3-5 minutes.
# It says STALE BINARIES when device-carry/ was built from other sources than the carried tree's
# (a hash of them, no git needed), runs the tests on the real driver only (PFC_CUDA_EMULATOR=0),
# bounds every step (nvidia-smi and the Python probes included) and names each TIMEOUT.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
carry="$root/device-carry"
mode="${1:-}"

# One hash of every source the binaries are built from: `run` recomputes it on the device (no
# git there) and says STALE BINARIES when the carried ones come from another tree.
source_hash() {
    (cd "$root" && find src cuda crates/cuda-emulator/src crates/cuda-emulator/cpp tests benches examples \
        Cargo.toml Cargo.lock -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64)
}

build() {
    set -e
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target}"
    rm -rf "$carry" && mkdir -p "$carry/bin" "$carry/golden"
    cd "$root"
    local json
    json="$(mktemp)"
    cargo test --release --features cuda --no-run --message-format=json --test cuda_kernels --test cuda_compile --test cuda_nccl --test cuda_memory --test cuda_step_fuzz --test cuda_checkpoint --test cuda_row_weights --test cuda_row_margins > "$json"
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
    { git -C "$root" rev-parse HEAD; echo "uncommitted files: $(git -C "$root" status --short | wc -l)"; } > "$carry/BUILD.txt"
    source_hash > "$carry/SOURCES.sha256"
    if [ -n "$(git -C "$root" status --porcelain -- src cuda crates tests benches examples Cargo.toml Cargo.lock)" ]; then
        echo "WARNING: built with uncommitted changes to the sources (the device run says so too)"
    fi
    cp "$root"/../shared/golden/*.safetensors "$carry/golden/" 2>/dev/null || echo "warning: no ../shared/golden"
    du -sh "$carry"
    ls -la "$carry/bin"
}

run() {
    out="${OUT:-$root/device-out}"
    mkdir -p "$out"
    log="$out/device-log.txt"
    exec > >(tee "$log") 2>&1
    tee_pid=$!
    deadline=$((SECONDS + ${PFC_DEVICE_BUDGET_S:-480}))
    echo "== device check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    orig_ld="${LD_LIBRARY_PATH:-}"  # torch runs with its own libraries, not ours
    # The Python with torch (and, beside it, the nvidia/*/lib wheels): the PATH's, or the venv's.
    py=python3
    timeout 60 python3 -c 'import torch' 2>/dev/null || py=/opt/torch/.venv/bin/python
    libs="/usr/local/cuda/lib64"
    for d in $(for p in python3 "$py"; do timeout 30 "$p" -c 'import site,glob,os; print(" ".join(sorted({os.path.dirname(p) for s in site.getsitepackages()+[site.getusersitepackages()] for p in glob.glob(s+"/nvidia/*/lib/*.so*")})))' 2>/dev/null; done | tr ' ' '\n' | sort -u); do
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
    timeout 20 nvidia-smi || echo "nvidia-smi failed or timed out ($?)"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || true
    (nvcc --version || ls /usr/local/cuda/lib64/libnvrtc.so*) 2>&1 | tail -3
    export PFC_GOLDEN_DIR="$carry/golden"
    # A test that cannot reach the GPU must fail here, not print "skipped" and pass.
    # and the real driver only: a test that falls back to the CPU emulator here wastes the run
    export PFC_REQUIRE_CUDA_TESTS=1 CI=true PFC_CUDA_EMULATOR=0
    echo "binaries built from: $(tr '\n' ' ' < "$carry/BUILD.txt" 2>/dev/null)"
    if [ ! -d "$carry/bin" ]; then
        echo "NO BINARIES: $carry/bin is missing (name device-carry in the run's carry)"
    elif [ "$(source_hash)" != "$(cat "$carry/SOURCES.sha256" 2>/dev/null)" ]; then
        echo "STALE BINARIES: built from other sources than this tree's (run build again)"
    else
        echo "binaries match this tree's sources"
    fi
    bin="$carry/bin"
    status=0
    # t LIMIT CMD...: CMD under `timeout`, cut to the time left; skipped when under 20 s are left.
    t() {
        local limit=$1 left
        shift
        left=$((deadline - SECONDS - 20))
        if ((left < 10)); then
            echo "SKIPPED (out of time): $*"
            return 124
        fi
        ((limit > left)) && limit=$left
        timeout -k 5 "$limit" "$@"
        local rc=$?
        ((rc == 124 || rc == 137)) && echo "TIMEOUT (${limit}s): $*"
        return $rc
    }
    san="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
    # sanitize TOOL LIMIT BINARY FILTERS...: a sanitizer run; "Device not supported" (a sandbox
    # without the debugger interface) is reported as unavailable, not as a kernel bug.
    sanitize() {
        local tool=$1 limit=$2 out rc
        shift 2
        out="$(mktemp)"
        t "$limit" "$san" --tool "$tool" --error-exitcode 9 "$@" --test-threads=1 > "$out" 2>&1
        rc=$?
        cat "$out"
        if grep -q "Device not supported" "$out"; then
            echo "SANITIZER $tool UNAVAILABLE on this machine (Device not supported)"
        elif ((rc == 127)); then
            echo "SANITIZER $tool UNAVAILABLE: no compute-sanitizer at $san"
        elif ((rc != 0)); then
            echo "SANITIZER $tool FAILED ($rc): $*"
            status=1
        fi
        rm -f "$out"
    }
    echo "== tests"
    # Each binary took 1-4 s on an H200; 120 s bounds a hang. NCCL's (peer timeouts, aborts)
    # goes last, so that a hang there costs no other test.
    for x in $(ls "$bin"/test-* 2>/dev/null | grep -v cuda_nccl) "$bin/test-cuda_nccl"; do
        echo "-- $x"
        t 120 "$x" --nocapture --test-threads=1 || status=1
    done
    echo "== benches"
    for b in "$bin"/bench-*; do
        t 200 "$b" --bench --warm-up-time 1 --measurement-time 2 --sample-size 10 || status=1
    done
    echo "== peak GPU memory of our step"
    for opts in "--precision f32 --momentum-dtype f32" "--precision bf16 --momentum-dtype f32" \
                "--precision bf16 --momentum-dtype bf16"; do
        t 120 "$bin/example-cuda_step_memory" $opts || status=1
    done
    echo "== PyTorch baseline (benches/torch_partial_fc.py)"
    LD_LIBRARY_PATH="$orig_ld" timeout 60 "$py" -c 'import torch; print("torch", torch.__version__, "at", torch.__file__)' || echo "no torch found"
    LD_LIBRARY_PATH="$orig_ld" t 240 "$py" -u "$root/benches/torch_partial_fc.py" || { echo "TORCH BASELINE FAILED ($?)"; status=1; }
    echo "== per-kernel profile of one step"
    t 120 "$bin/example-cuda_profile_step" || status=1
    filter="margin_softmax_passes_match_cpu margin_softmax_fused_matches_cpu padded_logits_rows normalize_gather optimizer_and_scatter adamw_matches_cpu localize_labels gemms class_max class_top_k margin_softmax16 wire_casts"
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool"
        sanitize "$tool" 150 "$bin/test-cuda_kernels" $filter
    done
    echo "== compute-sanitizer --tool memcheck (sampling)"
    sanitize memcheck 150 "$bin/test-cuda_kernels" sampled_index sampler_candidate
    echo "== compute-sanitizer --tool racecheck (sampler, small shards)"
    sanitize racecheck 120 "$bin/test-cuda_kernels" sampler_candidate
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool (wire kernels)"
        sanitize "$tool" 120 "$bin/test-cuda_nccl" wire_kernels
    done
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool (row weights)"
        sanitize "$tool" 120 "$bin/test-cuda_row_weights" scale_rows
    done
    echo "== compute-sanitizer --tool memcheck (per-row margin tables)"
    sanitize memcheck 120 "$bin/test-cuda_row_margins" margins_on_the_device_match_the_cpu
    echo "== multi_gpu example: launcher, TCP rendezvous, NCCL (one process per GPU)"
    ngpu="$(timeout 20 nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)"
    ((ngpu >= 1)) || ngpu=1
    MASTER_PORT=29517 t 120 "$bin/example-multi_gpu" --launch "$ngpu" --steps 3 --classes 200000 || status=1
    echo "== multi_gpu example with AdamW (bf16 moments)"
    MASTER_PORT=29519 t 120 "$bin/example-multi_gpu" --launch "$ngpu" --steps 3 --classes 200000 --optimizer adamw --momentum-dtype bf16 || status=1
    echo "== multi_gpu example with every 16-bit option (GEMMs and logits, momentum, both wires)"
    MASTER_PORT=29518 t 120 "$bin/example-multi_gpu" --launch "$ngpu" --steps 3 --classes 200000 \
        --precision bf16 --momentum-dtype bf16 --wire-dtype bf16 --grad-wire-dtype bf16 || status=1
    echo "== training demo with the classifier on the GPU (4 virtual ranks)"
    t 150 "$bin/example-train_synthetic" --backend cuda --steps 400 || status=1
    echo "== tests that did not run (only NCCL's several-ranks-on-one-GPU case may)"
    # (read into a variable first: grepping the log while tee appends to it could feed on itself)
    skips="$(grep -E "skipped|running on the CPU emulator" "$log" | grep -v "several ranks on one GPU\|ranks on one GPU:")"
    if [ -n "$skips" ]; then
        echo "$skips"
        status=1
    fi
    echo "== targets, each against its baseline in this run (scripts/device-summary.py)"
    sleep 1  # let tee write the lines above to the log first
    python3 "$root/scripts/device-summary.py" "$log" || echo "summary failed ($?)"
    echo "== done, status $status"
    # close our end of the pipe and let tee write the last lines before the command ends
    exec >&- 2>&-
    wait "$tee_pid" 2>/dev/null
    return $status
}

case "$mode" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
