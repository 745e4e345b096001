//! `scripts/device-summary.py` (the targets table of a device log) read against the log of the
//! first session's H200 run, whose numbers docs/benchmarks.md quotes, and against an alignment
//! probe in the format `examples/cuda_profile_step.rs` prints. Needs `python3`: without it the
//! test says it skipped, except in CI, where it fails.

use std::path::Path;
use std::process::Command;

fn summarize(log: &Path) -> Option<String> {
    let out = match Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/device-summary.py"))
        .arg(log)
        .output()
    {
        Ok(out) => out,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: python3 not runnable ({e})");
            return None;
        }
        Err(e) => panic!("python3 not runnable in CI: {e}"),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

fn line_with<'a>(table: &'a str, what: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no line with {what:?} in\n{table}"))
}

#[test]
fn the_first_h200_run_gives_the_documented_ratios() {
    let log = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/device/2026-11-27-h200-run5.txt");
    let Some(table) = summarize(&log) else { return };
    // docs/benchmarks.md, "GPU: NVIDIA H200": 85% and 83% of the copy, 5.3× the key read+write,
    // 3.52× faster than torch bf16, 59.7% of its peak, 1.29× / 1.32× the all-gather baseline.
    assert!(line_with(&table, "1024x100k three_passes").contains("| 85% | ≥ 80% | yes |"));
    assert!(line_with(&table, "1024x100k fused_one_kernel").contains("| 83% | ≥ 80% | yes |"));
    assert!(line_with(&table, "sampling 1M").contains("| 5.26× | ≤ 4× | **no** |"));
    assert!(line_with(&table, "cuda_bf16_sparse").contains("| 3.52× faster | ≥ 3× faster | yes |"));
    assert!(line_with(&table, "cuda_f32_sparse").contains("2.45× faster"));
    assert!(line_with(&table, "peak memory").contains("| 59.7% | ≤ 50% | **no** |"));
    assert!(line_with(&table, "f32_all_gather_labels_normalize").contains("| 1.29× |"));
    assert!(line_with(&table, "bf16_wire_pack_all_gather").contains("| 1.32× |"));
    assert!(line_with(&table, "reduce_scatter_f32").contains("NCCL + read/write 19.2 µs"));
    assert_eq!(table.matches("reduce_scatter_f32").count(), 1, "{table}");
    assert!(table.contains("not in the log: alignment probe"));
}

#[test]
fn the_alignment_probe_is_read_per_precision_and_kernel() {
    let log = std::env::temp_dir().join(format!("pfc-probe-{}.txt", std::process::id()));
    std::fs::write(
        &log,
        "== F32\n\
         -- alignment probe: S = 104857, rows dense (104857) vs padded (104864, the layer's)\n\
         \x20          gemm_nt, 104857 cols:    2.400 ms\n\
         \x20          gemm_nt, 104864 cols:    1.200 ms\n\
         == Bf16\n\
         -- alignment probe: S = 104857, rows dense (104857) vs padded (104864, the layer's)\n\
         \x20        gemm_nt16, 104857 cols:    1.100 ms\n\
         \x20        gemm_nt16, 104864 cols:    0.275 ms\n",
    )
    .unwrap();
    let table = summarize(&log);
    std::fs::remove_file(&log).unwrap();
    let Some(table) = table else { return };
    assert!(line_with(&table, "gemm_nt (F32)").contains("| 2.00× (dense ÷ padded) |"));
    assert!(line_with(&table, "gemm_nt16 (Bf16)").contains("| 4.00× (dense ÷ padded) |"));
    assert!(!table.contains("alignment probe,") && !table.ends_with("alignment probe"));
}

#[test]
fn without_the_torch_lines_our_numbers_still_print_and_short_names_keep_their_times() {
    let run5 = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/device/2026-11-27-h200-run5.txt");
    let without_torch: String = std::fs::read_to_string(run5)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("torch "))
        .map(|l| format!("{l}\n"))
        .collect();
    // Two short criterion names print their time on their own line.
    let short = "sampling_1M/sample_classes   time:   [64.000 µs 64.600 µs 65.000 µs]\n\
                 sampling_1M/keys_read_write  time:   [12.000 µs 12.300 µs 12.500 µs]\n";
    let log = std::env::temp_dir().join(format!("pfc-notorch-{}.txt", std::process::id()));
    std::fs::write(&log, format!("{without_torch}{short}")).unwrap();
    let table = summarize(&log);
    std::fs::remove_file(&log).unwrap();
    let Some(table) = table else { return };
    assert!(line_with(&table, "cuda_bf16_sparse")
        .contains("5.79 ms | torch bf16_autocast: not in the log"));
    assert!(line_with(&table, "peak memory").contains("4932.1 MiB"));
    assert!(line_with(&table, "peak memory").contains("torch: not in the log"));
    assert!(line_with(&table, "not in the log:").contains("torch baseline bf16_autocast"));
    // 64.6 / 12.3 from the one-line names (the last reading of each name wins).
    assert!(
        line_with(&table, "sampling 1M").contains("| 5.25× |"),
        "{table}"
    );
}
