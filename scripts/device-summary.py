#!/usr/bin/env python3
"""The issue targets, read from a log of `scripts/device-check.sh run`.

    python3 scripts/device-summary.py device-log.txt

Prints one Markdown table row per measured target, each number against the baseline measured in
the same run (the criterion benches, the PyTorch baseline, the step's memory, the alignment probe),
so that docs/benchmarks.md gets the numbers as the log has them, not as someone copied them.
A target whose lines are missing from the log prints as "not in the log". Standard library only:
the device machine has Python but nothing of this crate's build.
"""

import re
import sys

UNITS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def criterion(lines):
    """{"group/function": (median time in ms, median throughput in GiB/s or None)}."""
    out, name = {}, None
    for line in lines:
        s = line.strip()
        if re.fullmatch(r"[\w.]+/[\w.]+", s):
            name = s
            continue
        # A short name and its time share a line ("group/f   time: [...]"): the name is that one.
        m = re.match(r"(?:([\w.]+/[\w.]+)\s+)?time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", s)
        if m and (m.group(1) or name):
            name = m.group(1) or name
            out[name] = (float(m.group(2)) * UNITS[m.group(3)], None)
            continue
        m = re.match(r"thrpt:\s+\[\S+ \S+ (\S+) (\S+)", s)
        if m and name in out:
            value = float(m.group(1)) * {"GiB/s": 1.0, "MiB/s": 1 / 1024, "TiB/s": 1024}.get(
                m.group(2), float("nan"))
            out[name] = (out[name][0], value)
    return out


def torch_steps(lines):
    """{"f32" | "bf16_autocast": (median ms, peak MiB)} from the PyTorch baseline."""
    out = {}
    for line in lines:
        m = re.match(r"torch (\S+): step median ([\d.]+) ms.*peak memory ([\d.]+) MiB", line)
        if m:
            out[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return out


def step_memory(lines):
    """[(configuration, pool high-water MiB, free-memory delta MiB)] of cuda_step_memory runs."""
    out, config = [], None
    for line in lines:
        m = re.match(r"== CUDA step peak memory \((.*)\)", line)
        if m:
            config = m.group(1)
        m = re.match(r"memory pool high-water mark.*: ([\d.]+) MiB", line)
        if m and config:
            out.append([config, float(m.group(1)), None])
        m = re.match(r"device free before - after.*: ([\d.]+) MiB", line)
        # only to this configuration's row (one whose pool was "not available" has none)
        if m and out and out[-1][0] == config:
            out[-1][2] = float(m.group(1))
    return out


def alignment_probe(lines):
    """{(precision, kernel): {"dense": ms, "padded": ms}} from cuda_profile_step's probe."""
    out, precision, cols = {}, None, {}
    for line in lines:
        m = re.match(r"== (F32|Bf16)\s*$", line.strip())
        if m:
            precision = m.group(1)
        m = re.match(r"-- alignment probe: S = (\d+), rows dense \(\d+\) vs padded \((\d+)", line)
        if m:
            cols = {m.group(1): "dense", m.group(2): "padded"}
        m = re.match(r"\s*(\w+), (\d+) cols:\s+([\d.]+) ms", line)
        if m and m.group(2) in cols:
            out.setdefault((precision, m.group(1)), {})[cols[m.group(2)]] = float(m.group(3))
    return out


def row(what, ours, base, ratio, target, met):
    return f"| {what} | {ours} | {base} | {ratio} | {target} | {met} |"


def summary(text):
    lines = text.splitlines()
    bench, torch = criterion(lines), torch_steps(lines)
    rows = ["| what | ours | baseline, same run | ratio | target | met |", "|---|---|---|---|---|---|"]
    missing = []

    groups = sorted({k.split("/")[0] for k in bench if k.startswith("margin_softmax")})
    for g in groups:
        copy = bench.get(f"{g}/dtod_copy_same_bytes")
        for f in ("three_passes", "fused_one_kernel", "fused_one_kernel_row_margins"):
            ours = bench.get(f"{g}/{f}")
            if ours and copy and ours[1] and copy[1]:
                share = ours[1] / copy[1]
                rows.append(row(f"{g} {f}", f"{ours[0] * 1e3:.1f} µs = {ours[1]:.0f} GiB/s",
                                f"copy {copy[1]:.0f} GiB/s", f"{share:.0%}", "≥ 80%",
                                "yes" if share >= 0.8 else "**no**"))
    if not groups:
        missing.append("margin softmax")

    sample, keys = bench.get("sampling_1M/sample_classes"), bench.get("sampling_1M/keys_read_write")
    if sample and keys:
        x = sample[0] / keys[0]
        rows.append(row("sampling 1M classes, r = 0.1", f"{sample[0] * 1e3:.1f} µs",
                        f"key read + write {keys[0] * 1e3:.1f} µs", f"{x:.2f}×", "≤ 4×",
                        "yes" if x <= 4 else "**no**"))
    else:
        missing.append("sampling")

    for ours_name, torch_name in (("cuda_bf16_sparse", "bf16_autocast"), ("cuda_f32_sparse", "f32")):
        ours = bench.get(f"step_1M_b1024_d512_r0.1/{ours_name}")
        target = "≥ 3× faster" if torch_name == "bf16_autocast" else "—"
        if ours and torch_name in torch:
            x = torch[torch_name][0] / ours[0]
            met = ("yes" if x >= 3 else "**no**") if torch_name == "bf16_autocast" else "—"
            rows.append(row(f"whole step, {ours_name}", f"{ours[0]:.2f} ms",
                            f"torch {torch_name} {torch[torch_name][0]:.2f} ms", f"{x:.2f}× faster",
                            target, met))
        elif ours:
            # Our number stands; only its baseline is missing.
            rows.append(row(f"whole step, {ours_name}", f"{ours[0]:.2f} ms",
                            f"torch {torch_name}: not in the log", "—", target, "unknown"))
            missing.append(f"torch baseline {torch_name}")
        else:
            missing.append(f"whole step {ours_name}")

    torch_peak = max((p for _, p in torch.values()), default=None)
    for config, pool, free in step_memory(lines):
        ours = (f"{pool:.1f} MiB (free-memory delta "
                f"{free if free is not None else float('nan'):.1f})")
        if torch_peak:
            share = pool / torch_peak
            rows.append(row(f"peak memory ({config})", ours, f"torch {torch_peak:.1f} MiB",
                            f"{share:.1%}", "≤ 50%", "yes" if share <= 0.5 else "**no**"))
        else:
            rows.append(row(f"peak memory ({config})", ours, "torch: not in the log", "—",
                            "≤ 50%", "unknown"))
    if not step_memory(lines):
        missing.append("peak memory")

    for kind in ("all_gather", "reduce_scatter"):
        base = next((v for k, v in bench.items() if k.startswith("all_gather_1024x512/baseline_nccl_"
                                                                    + kind)), None)
        for k, v in sorted(bench.items()):
            function = k.split("/")[1]
            if k.startswith("all_gather_1024x512/") and kind in function and "baseline" not in k \
                    and base:
                x = v[0] / base[0]
                rows.append(row(function, f"{v[0] * 1e3:.1f} µs",
                                f"NCCL + read/write {base[0] * 1e3:.1f} µs", f"{x:.2f}×",
                                "no slower", "yes" if x <= 1 else "**no**"))
        if base is None:
            missing.append(f"{kind} baseline")

    probe = alignment_probe(lines)
    for (precision, kernel), t in sorted(probe.items()):
        if "dense" in t and "padded" in t:
            speedup = t["dense"] / t["padded"]
            rows.append(row(f"{kernel} ({precision}), padded rows", f"{t['padded']:.3f} ms",
                            f"dense rows {t['dense']:.3f} ms", f"{speedup:.2f}× (dense ÷ padded)",
                            "—", "—"))
    if not probe:
        missing.append("alignment probe")

    out = "\n".join(rows)
    if missing:
        out += "\n\nnot in the log: " + ", ".join(missing)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: device-summary.py DEVICE_LOG")
    with open(sys.argv[1], encoding="utf-8", errors="replace") as f:
        print(summary(f.read()))
